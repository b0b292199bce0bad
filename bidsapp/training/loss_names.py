"""The names of the selectable losses, and the lesion paper's weight of each domain loss.

Torch-free, so a trainer's command-line options can list them without importing torch;
:mod:`bidsapp.training.losses` implements them.
"""

DOMAIN_LOSSES = ("none", "pc", "rand", "du")
"""The scanner-invariant lesion paper's auxiliary losses (eqs. 3-4): none (BM/BDM), Pearson (L_pc),
randomised cross-entropy (L_rand), discrete-uniform cross-entropy (L_du)."""
DOMAIN_LAMBDA = {"none": 0.0, "pc": 0.2, "rand": 0.1, "du": 0.3}
"""The paper's lambda per auxiliary loss (grid search, section 4)."""
LESION_LOSSES = ("dice", "dice-bce")
"""The lesion channel's loss (:func:`bidsapp.training.losses.lesion_loss`): the paper's soft Dice, or
soft Dice + binary cross-entropy."""
