"""Training losses: one home for every loss a scanbridge network is trained with.

MONAI provides the Dice terms; what is specific to a method (the paired-acquisition consistency terms of
the tissue model, the Siamese contrastive loss of MRAI-NET) is written here once.
"""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from bidsapp.training.loss_names import DOMAIN_LOSSES


def dice_bce_loss():
    """Soft Dice (MONAI, on sigmoid probabilities) + binary cross-entropy on logits: binary masks
    (brain extraction)."""
    from monai.losses import DiceLoss

    dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    bce = torch.nn.BCEWithLogitsLoss()
    return lambda logits, target: dice(logits, target) + bce(logits, target)


class MaskedDiceCE:
    """Soft Dice (MONAI) + cross-entropy with soft targets, both restricted to the brain mask."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0):
        from monai.losses import DiceLoss

        self.dice = DiceLoss(include_background=True, softmax=False, batch=True, soft_label=True)
        self.ce_weight, self.dice_weight = ce_weight, dice_weight

    def __call__(self, logits, target, mask):
        import torch

        logp = torch.log_softmax(logits, dim=1)
        ce = -(target * logp).sum(1, keepdim=True)
        ce = (ce * mask).sum() / mask.sum().clamp_min(1.0)
        if not self.dice_weight:
            return self.ce_weight * ce
        return self.dice_weight * self.dice(logp.exp() * mask, target * mask) + self.ce_weight * ce


def volume_consistency_loss(logits, mask):
    """Relative difference of each class's soft volume between paired samples (2k, 2k+1): one patch
    seen with two acquisitions.

    The voxel-wise :func:`consistency_loss` weighs every voxel alike, so a boundary that moves by a
    fraction of a voxel with the acquisition (the volume drift that the paper's Table 2 measures)
    costs it little; this term states the drift directly. It compares the two acquisitions with each
    other, not with the gold standard, whose volume also moves with each subject's own tissue
    properties (up to 15 % between instances of one anatomy), which no acquisition parameter
    explains. The denominator is floored at 5 % of the patch's brain so a class nearly absent from a
    patch cannot dominate.
    """
    import torch

    dims = tuple(range(2, logits.ndim))
    vol = (torch.softmax(logits, dim=1) * mask).sum(dims)
    a, b, brain = vol[0::2], vol[1::2], mask[0::2].sum(dims)
    return ((a - b).abs() / torch.maximum((a + b) / 2, 0.05 * brain).clamp_min(1.0)).mean()


def consistency_loss(logits, mask):
    """Mean squared difference of the softmax of paired samples (2k, 2k+1) inside the brain mask."""
    import torch

    p = torch.softmax(logits, dim=1)
    a, b, m = p[0::2], p[1::2], mask[0::2]
    return (((a - b) ** 2).sum(1, keepdim=True) * m).sum() / m.sum().clamp_min(1.0)


class ContrastiveLoss(_Loss):
    """Siamese loss of section 2.1: ``y * d**2 + (1 - y) * max(0, margin - d)``.

    ``forward(distance, y)`` with y = 1 for similar pairs and 0 for dissimilar ones. ``reduction`` is
    ``"mean"`` (default; the per-batch scale stays independent of the batch size), ``"sum"`` (the paper's
    formula) or ``"none"``. The hinge is not squared, as published.
    """

    def __init__(self, margin: float = 1.0, reduction: str = "mean"):
        super().__init__(reduction=reduction)
        if margin <= 0:
            raise ValueError(f"margin must be positive, got {margin}")
        self.margin = float(margin)

    def forward(self, distance: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.to(distance.dtype)
        loss = y * distance.pow(2) + (1 - y) * torch.clamp(self.margin - distance, min=0)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction == "none":
            return loss
        raise ValueError(f"unknown reduction {self.reduction!r}")


# ------------------------------------------------------------------- domain regularisation (lesion paper)
def domain_loss(kind: str, logits: torch.Tensor, domain: torch.Tensor, generator=None) -> torch.Tensor:
    """Auxiliary loss of the regularisation network: ``logits`` (B, n) of the domain head, ``domain``
    (B,) the true domain indices. ``pc``: Pearson correlation between the softmax and the one-hot truth
    (minimised: eq. 3); ``rand``: cross-entropy against domain labels drawn at random for every input
    and iteration (eq. 4 with shuffled truth); ``du``: cross-entropy against the uniform distribution."""
    n = logits.shape[1]
    if kind == "pc":
        c = torch.softmax(logits, dim=1)
        h = torch.nn.functional.one_hot(domain, n).to(c.dtype)
        cc, hh = c - c.mean(1, keepdim=True), h - h.mean(1, keepdim=True)
        r = (cc * hh).sum(1) / torch.sqrt((cc ** 2).sum(1) * (hh ** 2).sum(1)).clamp_min(1e-8)
        return r.mean()
    if kind == "rand":
        shuffled = torch.randint(0, n, domain.shape, generator=generator).to(logits.device)
        return torch.nn.functional.cross_entropy(logits, shuffled)
    if kind == "du":
        return -(torch.log_softmax(logits, dim=1)).mean(1).mean()
    raise ValueError(f"unknown domain loss {kind!r}; known: {', '.join(DOMAIN_LOSSES[1:])}")


def adversary_ramp(progress: float) -> float:
    """Ganin & Lempitsky's schedule of the reversed gradient's weight, 0 at the start of training to
    nearly 1 at its end (``2 / (1 + exp(-10 p)) - 1``): the domain head learns before it is fought."""
    import math

    return 2.0 / (1.0 + math.exp(-10.0 * float(progress))) - 1.0


def lesion_loss(bce: bool = False):
    """The lesion channel's loss: the soft Dice of eq. 5 (squared denominators, MONAI), batch-wise so
    patches with little lesion do not dominate; ``bce`` adds binary cross-entropy at equal weight
    (nnU-Net's Dice + CE), which penalises confident voxels past a lesion's edge that Dice alone
    tolerates. The anatomical context channels add Dice + BCE at weight 0.5 either way."""
    from monai.losses import DiceLoss

    dice = DiceLoss(sigmoid=True, squared_pred=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
    context = dice_bce_loss()

    def loss(logits, target):
        out = dice(logits[:, :1], target[:, :1]) + 0.5 * context(logits[:, 1:], target[:, 1:])
        if bce:
            out = out + torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :1], target[:, :1])
        return out
    return loss


def wmh_loss(kind: str, features_net=None):
    """The WMH generator's lesion loss, ``f(logits, soft_truth, image)`` on one sigmoid channel:
    ``content`` (the Siamese content loss of :class:`bidsapp.models.wmh.ContentLoss` with the frozen
    ``features_net``) or the paper's baselines from MONAI: ``dice`` (epsilon 1), ``tversky`` (alpha 0.3
    on false positives, beta 0.7 on false negatives), ``gdice`` (generalised Dice).

    The overlap losses sum over the whole batch of slices, as the paper's Keras losses over the flattened
    batch: averaged per slice, each of the many lesion-free slices scores a perfect 0 for an empty
    output, and a Dice-trained generator learned to mark nothing (Dice 0.00 on every test session)."""
    from monai.losses import DiceLoss, GeneralizedDiceLoss, TverskyLoss

    if kind == "content":
        from bidsapp.models.wmh import ContentLoss

        if features_net is None:
            raise ValueError("the content loss needs the feature network")
        content = ContentLoss(features_net)
        return lambda logits, truth, image: content(image, torch.sigmoid(logits), truth)
    overlap = {"dice": lambda: DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, batch=True),
               "tversky": lambda: TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7, batch=True),
               "gdice": lambda: GeneralizedDiceLoss(sigmoid=True, batch=True)}
    if kind not in overlap:
        raise ValueError(f"unknown WMH loss {kind!r}; known: content, {', '.join(overlap)}")
    fn = overlap[kind]()
    return lambda logits, truth, image: fn(logits, truth)
