"""Nipype workflows of scanbridge (``init_*_wf`` factories); interfaces wrap antspyx and the models."""
