"""Seed specs, the seed -> shard -> batch layout, ModelSpec and the image conversion (no processes, no sampling)."""

import numpy as np
import pytest
import torch

import fastguide
from fastguide.generation import ModelSpec, from_uint8_images, parse_seeds, to_uint8_images
from fastguide.generation.models import load_model, resolve_options
from fastguide.generation.seeds import SeedSpecError, assign, batches, format_seeds, shard_seeds


def test_ranges_and_lists_parse_sorted():
    assert parse_seeds("0-9,20,30-31") == list(range(10)) + [20, 30, 31]
    assert parse_seeds("31, 20 ,0-2") == [0, 1, 2, 20, 31]
    assert parse_seeds("7") == [7]
    assert parse_seeds(5) == [5]
    assert parse_seeds([3, 1, np.int64(2)]) == [1, 2, 3]
    assert len(parse_seeds("0-49999")) == 50000


@pytest.mark.parametrize("spec, words", [
    ("-1", "seeds must be >= 0"), ("0--3", "cannot read"), ("5-3", "runs backwards"), ("1,2,1", "1 listed more"),
    ("0-9,5", "5 listed more"), ("abc", "cannot read"), ("", "empty"), ("1,,2", "cannot read"),
    ("1.5", "cannot read"), ([-2], "0.."), ([], "empty"), ([1.0], "integers"), (True, "seed spec"),
    (f"0-{2 ** 64}", "int64"),
])
def test_bad_specs_are_refused_naming_the_part(spec, words):
    with pytest.raises(SeedSpecError) as exc:
        parse_seeds(spec)
    assert "--seeds" in str(exc.value) and words in str(exc.value)


def test_canonical_form_round_trips():
    for spec in ("0-9,20,30-31", "5", "0-49999", "1,3,5-6"):
        assert format_seeds(parse_seeds(spec)) == spec
    assert format_seeds(parse_seeds("3,2,1,0")) == "0-3"


def test_shards_do_not_depend_on_world_size_or_batch():
    seeds = parse_seeds("0-9,20,30-31")
    shards = shard_seeds(seeds, 5)
    assert shards == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [20, 30, 31]]
    assert batches(shards[0], 2) == [[0, 1], [2, 3], [4]]
    for world in (1, 2, 3, 7):
        dealt = sorted(i for r in range(world) for i in assign(range(len(shards)), r, world))
        assert dealt == list(range(len(shards)))  # every shard to exactly one rank
    assert assign([4, 0, 2], 1, 2) == [2]


def test_uint8_images_are_nhwc_and_round_trip_within_half_a_step():
    x = torch.rand(3, 1, 8, 8) * 2.2 - 1.1  # overshoots [-1, 1] a little
    images = to_uint8_images(x)
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 1)
    assert images[0, 2, 5, 0] == np.clip(np.round((x[0, 0, 2, 5].item() + 1) * 127.5), 0, 255)
    back = from_uint8_images(images)
    inside = x.abs() <= 1
    assert back.shape == x.shape and (back - x)[inside].abs().max() <= 1 / 255 + 1e-6
    rgb = to_uint8_images(torch.zeros(2, 3, 4, 5))
    assert rgb.shape == (2, 4, 5, 3) and (rgb == 128).all()


def test_model_spec_defaults_and_options():
    net = lambda x, t, y=None: torch.zeros_like(x)  # noqa: E731
    spec = ModelSpec(model=net, schedule=fastguide.Schedule.ddpm(), sample_shape=(1, 4, 4), num_classes=3,
                     null_label=3)
    assert set(spec.methods) == {"none", "cfg"}
    assert resolve_options(spec, "cfg", {"cfg_scale": 1.5}) == {"cfg_scale": 1.5}
    assert spec.guidance("cfg", cfg_scale=1.5)[0].scale == 1.5
    with pytest.raises(ValueError, match="--classifier-scale does not apply to --method cfg"):
        resolve_options(spec, "cfg", {"classifier_scale": 1.0})
    with pytest.raises(ValueError, match="--cfg-scale must be a finite number"):
        resolve_options(spec, "cfg", {"cfg_scale": -1.0})
    with pytest.raises(ValueError, match="--method 'adm' is not a method"):
        resolve_options(spec, "adm", {})
    x = torch.zeros(2, 1, 4, 4)
    assert spec.conditional(True)(x, torch.zeros(2), torch.tensor([0, 1])).shape == x.shape
    with pytest.raises(ValueError, match="no null label"):
        ModelSpec(model=net, schedule=fastguide.Schedule.ddpm(), sample_shape=(1, 4, 4)).conditional(True)


def test_model_names_resolve_or_fail_clearly():
    spec = load_model("digits")
    assert spec.name == "digits" and tuple(spec.methods) == ("none", "cfg", "adm", "offshelf_xt", "offshelf", "dg")
    assert spec.guidance("adm", classifier_scale=2.0)[0].scale == 2.0
    assert spec.guidance("dg", dg_weight=0.5)[0].weight == 0.5
    for bad, words in (("nodigits", "not a built-in"), ("no_such_module_xyz:f", "cannot import"),
                       ("fastguide.generation.models:nothing", "no callable"),
                       ("fastguide.generation.models:option_flag", None)):
        with pytest.raises((ValueError, TypeError)) as exc:
            load_model(bad)
        assert words is None or words in str(exc.value)


class _StuckStore:
    """A key-value store where the other rank never finishes (it died)."""

    def __init__(self):
        self.values = {}

    def add(self, key, amount):
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]


def test_the_end_of_run_wait_gives_up_when_nothing_moves():
    from fastguide.generation.comm import Comm

    comm = Comm(rank=0, world_size=2, timeout=0.3)
    comm.distributed, comm._store = True, _StuckStore()  # a 2-rank job whose rank 1 is gone
    seen = []
    with pytest.raises(TimeoutError, match="1 of 2 ranks made no progress for 0 s"):
        comm.wait_all_finished(seen.append, poll=0.01)
    assert seen == [0]
    alone = Comm()
    alone.wait_all_finished(seen.append)  # one process: nothing to wait for
