"""Fixtures shared by the test modules (helpers that are plain functions live in synthetic.py and
bids_support.py). Session-scoped ones are built once per test run; nothing writes into them."""

from __future__ import annotations

import pytest

from synthetic import RES, make_session


def pytest_configure(config):
    """Workflows run in tests poll for finished nodes as the CLI's do (bidsapp.cli.NIPYPE_SETTINGS)."""
    from nipype import config as nipype_config

    from bidsapp.cli import NIPYPE_SETTINGS

    nipype_config.set("execution", "poll_sleep_duration", NIPYPE_SETTINGS["execution"]["poll_sleep_duration"])


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory):
    """The offline template at the tiny heads' resolution (3 mm)."""
    from bidsapp.templates import get_template

    return get_template(resolution=int(RES), cache_dir=tmp_path_factory.mktemp("tplcache"), offline=True)


@pytest.fixture(scope="session")
def tiny_session(tmp_path_factory):
    """A one-session BIDS dataset (3 mm T1w MPRAGE + FLAIR of a deformed ICBM152 head) with its truth;
    see :func:`synthetic.make_session`. Read-only for the tests."""
    return make_session(tmp_path_factory.mktemp("tiny_session"))
