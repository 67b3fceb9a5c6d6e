"""The Hydra patch is an improvement of one message and must never be a requirement."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

import kdrun._hydra_compat as compat
from tests.conftest import compose_cfg


def test_a_mistyped_override_names_the_closest_key():
    assert compat.install_override_suggestions()
    assert compat.install_override_suggestions()  # idempotent
    with pytest.raises(ConfigCompositionException, match=r"'temprature' is not a key of loss.kd. Did you mean 'temperature'"):
        compose_cfg(["loss.kd.temprature=8"])


def test_without_the_private_method_hydras_own_message_stays(monkeypatch):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    monkeypatch.delattr(ConfigLoaderImpl, "_apply_overrides_to_config")
    assert compat.install_override_suggestions() is False


def test_an_unexpected_override_shape_keeps_hydras_message(monkeypatch):
    compat.install_override_suggestions()
    monkeypatch.setattr(compat, "_suggestion", lambda overrides, cfg: 1 / 0)
    with pytest.raises(ConfigCompositionException, match="Could not override 'loss.kd.temprature'"):
        compose_cfg(["loss.kd.temprature=8"])


def test_copies_of_the_config_store_share_it_and_composition_still_isolates_nodes():
    """install_fast_help: deep copies of the ConfigStore are the store itself (kdrun --help built one copy
    per config group), while every composed config is still its own copy."""
    import copy

    from hydra.core.config_store import ConfigStore

    from kdrun._hydra_compat import install_fast_help
    from tests.conftest import compose_cfg

    assert install_fast_help()
    store = ConfigStore.instance()
    assert copy.deepcopy(store) is store
    a = compose_cfg(["trainer.max_epochs=3"])
    a.trainer.max_epochs = 5
    assert compose_cfg([]).trainer.max_epochs is None
