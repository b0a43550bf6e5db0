"""TokenUnify on moving-disc volumes: the generator's continuity across slices (checked without the generator's
own geometry), the roll-out measurement on hand-made predictors, and the study's CLI refusals."""

import math

import pytest
import torch
from mmreduce.tokenizers_visual.tokenunify.model import TokenUnifyConfig, TokenUnifyModel
from mmreduce.tokenizers_visual.tokenunify.rollout import growth_slope, rollout_errors
from mmreduce.tokenizers_visual.tokenunify.rollout_study import main as study_main
from mmreduce.tokenizers_visual.tokenunify.rollout_study import study_config
from mmreduce.tokenizers_visual.tokenunify.tokens import patchify
from mmreduce.tokenizers_visual.tokenunify.volumes import MovingDiscSpec, make_moving_volume, make_moving_volumes


@pytest.fixture(scope="module")
def volumes():
    return make_moving_volumes(64, (12, 16, 16), seed=3)[0]  # (64, 12, 16, 16)


def test_volumes_are_deterministic_and_in_range(volumes):
    again = make_moving_volumes(64, (12, 16, 16), seed=3)[0]
    assert torch.equal(volumes, again)
    assert volumes.min() >= 0 and volumes.max() <= 1
    assert not torch.equal(volumes, make_moving_volumes(64, (12, 16, 16), seed=4)[0])


def test_consecutive_slices_closer_than_random_pairs(volumes):
    consecutive = ((volumes[:, 1:] - volumes[:, :-1]) ** 2).mean()
    # The same slice positions, but the previous slice taken from another volume.
    shuffled = volumes.roll(1, dims=0)
    random_pairs = ((volumes[:, 1:] - shuffled[:, :-1]) ** 2).mean()
    assert consecutive < 0.25 * random_pairs


def test_copy_last_slice_beats_the_mean_slice(volumes):
    tokens = patchify(volumes, (1, 16, 16))  # (64, 12, 256): one token per slice
    mean_token = make_moving_volumes(64, (12, 16, 16), seed=5)[0].mean(dim=(0, 1)).flatten()  # from other volumes
    target = tokens[:, 1:]
    copy_mse = ((tokens[:, :-1] - target) ** 2).mean()
    mean_mse = ((mean_token - target) ** 2).mean()
    assert copy_mse < 0.5 * mean_mse


def test_disc_labels_follow_a_straight_line():
    # Independent of how the image is drawn: the centroid of each slice's single disc moves with constant velocity
    # (second differences near zero) unless the border cuts the disc.
    spec = MovingDiscSpec(max_discs=1, radius=(2.0, 2.5), noise=0.0)
    for seed in range(5):
        _, labels = make_moving_volume((10, 32, 32), seed, spec)
        mask = torch.from_numpy(labels == 1).float()
        area = mask.sum(dim=(1, 2))
        ys = torch.arange(32.0)[None, :, None]
        xs = torch.arange(32.0)[None, None, :]
        cy, cx = (mask * ys).sum(dim=(1, 2)) / area, (mask * xs).sum(dim=(1, 2)) / area
        inside = [z for z in range(10) if area[z] > 0 and 3 <= cy[z] <= 28 and 3 <= cx[z] <= 28]
        for z in inside:
            if z - 1 in inside and z + 1 in inside:
                assert abs(cy[z + 1] - 2 * cy[z] + cy[z - 1]) < 0.6
                assert abs(cx[z + 1] - 2 * cx[z] + cx[z - 1]) < 0.6


def test_bad_volume_arguments_are_named():
    with pytest.raises(ValueError, match="radius"):
        MovingDiscSpec(radius=(3.0, 2.0))
    with pytest.raises(ValueError, match="does not fit"):
        make_moving_volume((4, 8, 8), 0, MovingDiscSpec(radius=(2.0, 5.0)))
    with pytest.raises(ValueError, match="shape"):
        make_moving_volume((8, 8), 0)
    with pytest.raises(ValueError, match="data must be one of"):
        TokenUnifyConfig(data="mri")


def _sequence(seed=0, b=3, k=6, p=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, k, p, generator=g)


def test_perfect_predictor_has_zero_rollout_error():
    truth = _sequence()
    start_seq = truth.clone()
    start_seq[:, 2:] = 5.0  # filler after the given prefix
    errs = rollout_errors(lambda seq, position: truth[:, position], start_seq, truth, start=2, length=4)
    assert errs == [0.0, 0.0, 0.0, 0.0]


def test_constant_predictor_matches_hand_computation():
    truth = _sequence(seed=1)
    start_seq = truth.clone()
    errs = rollout_errors(lambda seq, position: torch.full((3, 4), 0.25), start_seq, truth, start=1, length=5)
    for j, err in enumerate(errs):
        values = truth[:, 1 + j].flatten().tolist()
        hand = sum((v - 0.25) ** 2 for v in values) / len(values)
        assert err == pytest.approx(hand, rel=1e-6)


def test_rollout_feeds_its_own_predictions_back():
    # Predict "previous token + 1": the error at step j is then j^2 on a constant-zero truth, because each guess
    # builds on the previous guess, not on the truth.
    truth = torch.zeros(2, 6, 3)
    errs = rollout_errors(lambda seq, position: seq[:, position - 1] + 1.0, truth.clone(), truth, start=1, length=5)
    assert errs == pytest.approx([1.0, 4.0, 9.0, 16.0, 25.0])
    assert growth_slope(errs) == pytest.approx(2.0)


def test_growth_slope_of_power_laws():
    assert growth_slope([3.0 * (k + 1) for k in range(10)]) == pytest.approx(1.0)
    assert growth_slope([math.sqrt(k + 1) for k in range(10)]) == pytest.approx(0.5)
    assert growth_slope([0.2] * 5) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="positive"):
        growth_slope([0.1, 0.0])


def test_rollout_range_is_checked():
    truth = _sequence()
    with pytest.raises(ValueError, match="start"):
        rollout_errors(lambda s, p: truth[:, p], truth, truth, start=0, length=2)
    with pytest.raises(ValueError, match="start"):
        rollout_errors(lambda s, p: truth[:, p], truth, truth, start=3, length=4)


def test_study_config_is_one_token_per_slice():
    config = study_config("volumes")
    assert config.num_tokens == config.volume[0] and config.patch_voxels == config.volume[1] * config.volume[2]
    model = TokenUnifyModel(config)
    vols = make_moving_volumes(2, config.volume, seed=0)[0]
    assert model.loss(vols, "tokenunify", torch.Generator().manual_seed(0)).isfinite()
    assert study_config("em") == TokenUnifyConfig()


def test_study_cli_refuses_bad_input(tmp_path, capsys):
    assert study_main(["eval", "--runs", "next"]) == 2
    assert "name=folder1,folder2" in capsys.readouterr().err
    assert study_main(["eval", "--runs", f"next={tmp_path}"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert study_main(["train", "--objective", "next", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "steps" in capsys.readouterr().err


def test_study_eval_and_table_on_untrained_models(tmp_path, capsys):
    folders = {}
    for name in ("next", "tokenunify"):
        folders[name] = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            folder = tmp_path / f"{name}-{seed}"
            TokenUnifyModel(study_config("volumes")).save(folder)
            folders[name].append(str(folder))
    out = tmp_path / "summary.json"
    runs = [f"{name}={','.join(f)}" for name, f in folders.items()]
    assert study_main(["eval", "--runs", *runs, "--n", "4", "--json", str(out)]) == 0
    capsys.readouterr()
    import json

    summary = json.loads(out.read_text())
    tu = summary["per_objective"]["tokenunify"]
    assert len(tu["per_seed"]) == 2 and len(tu["rollout_mean"]) == 10  # 12 slices, 2 given
    first = [r["rollout"][0] for r in tu["per_seed"]]
    assert tu["rollout_mean"][0] == pytest.approx(sum(first) / 2)
    assert set(summary["baselines"]["next_mse"]) == {"baseline_copy_previous", "baseline_mean_token",
                                                     "baseline_linear_neighbours"}
    assert study_main(["table", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| tokenunify (mean ± std over 2 seeds) |" in text and "step 10" in text
    assert (tmp_path / "summary.png").stat().st_size > 0  # the figure next to the JSON
