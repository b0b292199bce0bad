"""BIDS input and output for scanbridge.

* :mod:`.discovery` - open a BIDS dataset with pybids and plan what to process (subjects,
  sessions, anatomical images, qMRI maps, participants.tsv, filters, labels).
* :mod:`.acquisition` - :class:`~.acquisition.AcquisitionRecord`: scanner and protocol of an
  image in BIDS units, sequence family and acquisition group key.
* :mod:`.validation` - image checks before processing and the BIDS validator.
* :mod:`.derivatives` - derivative file names, BIDS URIs, atomic writes, sidecars,
  dataset_description.json.
* :mod:`.collect` - find a subject's derivatives back (reports, group level).

Bad user input raises :class:`~.errors.BIDSInputError` whose message is one line naming the file.
"""

from .errors import BIDSInputError

__all__ = ["BIDSInputError"]
