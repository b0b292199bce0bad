"""Nipype interfaces around antspyx and scanbridge models.

Importing them in a Nipype worker ties the worker's life to the run's (:mod:`bidsapp.lifecycle`).
"""

from bidsapp.lifecycle import exit_with_parent

exit_with_parent()
