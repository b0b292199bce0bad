"""scanbridge: scanner- and protocol-robust structural brain MRI, as a BIDS App."""

__version__ = "0.1.0"
