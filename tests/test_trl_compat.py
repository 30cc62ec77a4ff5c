"""The private TRL methods ECGGRPOTrainer overrides still have the signature and the private names the
overrides were written against (utils/training/trl_compat.py)."""

import inspect

import pytest

from utils.training import trl_compat


@pytest.fixture(scope="module")
def trainer_cls():
    from utils.training.grpo.trainer import trainer_class

    return trainer_class()


def test_every_private_override_is_registered(trainer_cls):
    """Each method ECGGRPOTrainer defines over a private GRPOTrainer method carries @overrides."""
    from trl import GRPOTrainer

    own = {name for name, v in vars(trainer_cls).items() if inspect.isfunction(v) and name.startswith("_")
           and hasattr(GRPOTrainer, name)}
    registered = set(trl_compat.REGISTRY.get("GRPOTrainer", {}))
    assert own, "ECGGRPOTrainer overrides no private TRL method: drop trl_compat or this test"
    assert own == registered, f"overrides without @overrides: {sorted(own - registered)}; " \
                              f"registered but not defined: {sorted(registered - own)}"
    for o in trl_compat.REGISTRY["GRPOTrainer"].values():
        assert o.trl_version == trl_compat.WRITTEN_AGAINST and o.parameters[0] == "self"


def test_installed_trl_matches_the_overrides(trainer_cls):
    from trl import GRPOTrainer

    found = trl_compat.problems("GRPOTrainer", GRPOTrainer)
    assert not found, "TRL's private methods changed under ECGGRPOTrainer's overrides; review each and update " \
                      "utils/training/grpo/trainer.py:\n" + "\n".join(found)


def test_a_changed_signature_is_reported(trainer_cls):
    """Against a GRPOTrainer whose private method gained a parameter, or lost them all, problems() names
    each difference."""
    from trl import GRPOTrainer

    class Changed(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False, new_flag=None):
            raise AssertionError("not called")

        def _prepare_inputs(self, generation_batch):
            raise AssertionError("not called")

    found = trl_compat.problems("GRPOTrainer", Changed)
    assert len(found) == 1 and "_generate_single_turn" in found[0] and "new_flag" in found[0], found

    class Gone:
        pass

    gone = trl_compat.problems("GRPOTrainer", Gone)
    assert len(gone) == len(trl_compat.REGISTRY["GRPOTrainer"]) and all("is gone" in g for g in gone)


def test_drift_falls_back_to_trls_own_trainer(trainer_cls, monkeypatch, caplog):
    """When TRL no longer fits the overrides, TRL's own GRPOTrainer runs (with a warning), so no override is
    called with arguments it does not expect; when it fits, ECGGRPOTrainer does."""
    import logging

    from trl import GRPOTrainer

    from utils.training.grpo import trainer as trainer_mod

    assert trainer_mod.pick_trainer_class(True, True) == (trainer_cls, [])
    assert trainer_mod.pick_trainer_class(False, False) == (GRPOTrainer, [])
    monkeypatch.setattr(trainer_mod, "problems", lambda owner, cls: ["trl 9.9 GRPOTrainer._prepare_inputs is gone"])
    with caplog.at_level(logging.WARNING):
        cls, drift = trainer_mod.pick_trainer_class(True, True)
    assert cls is GRPOTrainer and drift
    assert any("_prepare_inputs is gone" in r.getMessage() for r in caplog.records)
    # skip_tied_groups changes what is optimised: refused on drift, never silently dropped
    from utils.core.config import UserError

    with pytest.raises(UserError, match="skip_tied_groups.*_prepare_inputs is gone"):
        trainer_mod.pick_trainer_class(False, False, skip_tied_groups=True)
    with pytest.raises(UserError, match="length_neutral needs.*_prepare_inputs is gone"):
        trainer_mod.pick_trainer_class(True, True, length_neutral=0.5)


def test_trl_still_takes_every_loss_type_and_level():
    """The GRPO config's loss_type and importance_sampling_level choices are the ones the installed TRL's
    loss implements (a name TRL dropped would fail only at the first step)."""
    from trl.trainer import grpo_trainer

    from utils.core.config import _fields
    from utils.training.grpo.config import LOSS_TYPES, GRPOTrainConfig

    source = inspect.getsource(grpo_trainer.GRPOTrainer._compute_loss)
    for name in LOSS_TYPES:
        assert f'"{name}"' in source, f"TRL's GRPOTrainer._compute_loss no longer handles loss_type {name}"
    for level in _fields(GRPOTrainConfig)["importance_sampling_level"].metadata["choices"]:
        assert f'"{level}"' in source, f"TRL no longer has importance_sampling_level {level}"
