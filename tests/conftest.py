"""Shared fixtures (learner and edge processes); the helpers behind them live in tests/helpers/
(``helpers.policy.builtin_policy`` is the one policy factory, ``helpers.net.free_port`` the one port helper).

Tiers: tests that start real processes (learner, edges, the demo, Prometheus, entrypoints) or a fresh
interpreter are marked ``slow``; ``make test-fast`` runs the rest (``-m "not slow"``), ``make test``
runs everything, as CI does. GPU tests are marked ``gpu`` and skip cleanly without CUDA.
"""

from __future__ import annotations

import pytest

from helpers.cluster import HOGS, ROBOTS, Cluster
from helpers.policy import builtin_policy, save_checkpoint
from pirl.security import make_dev_pki


@pytest.fixture(scope="session")
def runtime_setup(tmp_path_factory):
    """(root, checkpoint, pki) for process tests: the built-in policy saved like an SFT checkpoint and a
    dev PKI with tokens for ROBOTS and HOGS."""
    root = tmp_path_factory.mktemp("runtime")
    ckpt = save_checkpoint(root / "policy", *builtin_policy(0))
    pki = make_dev_pki(root / "certs", ROBOTS + HOGS)
    return root, ckpt, pki


@pytest.fixture
def cluster(runtime_setup, request):
    """A learner and edges as real processes (helpers.cluster.Cluster), all killed at the end."""
    root, ckpt, pki = runtime_setup
    c = Cluster(root, ckpt, pki, request.node.name)
    yield c
    c.close()


@pytest.fixture(scope="session")
def toy_plugin(tmp_path_factory):
    """The toy ``lerobot_env_pirltoy`` distribution (helpers/toy_env.py), installed on ``sys.path`` and registered
    the way LeRobot finds plugins; yields the directory to put on a subprocess's ``PYTHONPATH``."""
    import sys

    from lerobot.utils.import_utils import register_third_party_plugins

    from helpers.toy_env import install_toy_env_plugin

    site = install_toy_env_plugin(tmp_path_factory.mktemp("toy_plugin"))
    sys.path.insert(0, str(site))
    try:
        register_third_party_plugins()
        yield site
    finally:
        sys.path.remove(str(site))
