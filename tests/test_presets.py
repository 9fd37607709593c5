"""The training guide's dataset-size table as a preset, and the CLI options made from
TrainConfig's own field descriptions."""

import pytest

from napari_microclf.cli import _config_from_args, build_parser
from napari_microclf.core.sample import write_sample
from napari_microclf.core.train import TrainConfig, count_images, suggest_settings
from napari_microclf.core.train_config import help_of


@pytest.mark.parametrize(
    "n, row, batch, lr, dropout, fine_tune",
    [
        (60, "very small dataset", 8, 1e-3, 0.35, 0),
        (600, "medium dataset", 32, 1e-3, 0.2, 0),
        (1600, "large dataset", 64, 1e-3, 0.2, 2),
    ],
)
def test_the_guides_row_for_the_dataset_size(n, row, batch, lr, dropout, fine_tune):
    p = suggest_settings(n)
    assert p.row == row and str(n) in p.reason and row in p.text
    s = p.settings
    assert (s["batch_size"], s["learning_rate"], s["dropout"], s["fine_tune"]) == (
        batch,
        lr,
        dropout,
        fine_tune,
    )
    TrainConfig("d", **s)  # every suggestion is a valid setting


def test_row_boundaries():
    assert suggest_settings(99).row == "very small dataset"
    assert suggest_settings(100).row == "medium dataset"
    assert suggest_settings(1000).row == "medium dataset"
    assert suggest_settings(1001).row == "large dataset"


def test_cli_preset_fills_only_what_was_not_given(tmp_path, capsys):
    data = write_sample(tmp_path, n_per_class=20, size=32, seed=0)["dataset"]
    assert count_images(data) == 60
    parser = build_parser()
    args = parser.parse_args(
        ["train", str(data), "--out", "m", "--preset", "auto", "--learning-rate", "0.003"]
    )
    config = _config_from_args(args, "m")
    out = capsys.readouterr().out
    assert "very small dataset" in out and "Kept from the command line: learning_rate" in out
    assert config.batch_size == 8 and config.dropout == 0.35  # from the preset
    assert config.learning_rate == 0.003  # given, kept
    plain = _config_from_args(parser.parse_args(["train", str(data), "--out", "m"]), "m")
    assert plain == TrainConfig(str(data), "m")  # no preset: the defaults


def test_the_guides_recipe_is_one_option_away(tmp_path, capsys):
    """``--preset guide`` gives the training guide's exact recipe; the defaults that depart
    from it are said in the log, each with why, and not when the user set them."""
    from napari_microclf.core.train_config import GUIDE, guide_departures

    parser = build_parser()
    args = parser.parse_args(["train", str(tmp_path), "--out", "m", "--preset", "guide"])
    config = _config_from_args(args, "m")
    assert "training guide" in capsys.readouterr().out
    assert (config.learning_rate, config.epochs, config.class_weights, config.intensity) == (
        1e-4,
        15,
        "balanced",
        "percentile",
    )
    assert all(getattr(config, k) == v for k, v in GUIDE.items())
    assert guide_departures(config) == []
    said = " ".join(guide_departures(TrainConfig("d")))
    assert all(w in said for w in ("1e-3", "200 epochs", "'sqrt'", "'auto'"))
    own = guide_departures(TrainConfig("d", learning_rate=3e-4, class_weights="none"))
    assert not any("learning rate" in w or "class weights" in w for w in own)


@pytest.mark.parametrize("old, now", [(True, "balanced"), (False, "none")])
def test_settings_of_older_models_still_load(old, now):
    """Bundles from before the weighting choice stored class_weights as a boolean."""
    assert TrainConfig("d", class_weights=old).class_weights == now
    with pytest.raises(ValueError, match="class weights must be one of"):
        TrainConfig("d", class_weights="inverse")


def test_cli_options_come_from_the_config_fields():
    parser = build_parser()
    args = parser.parse_args(
        [
            "train",
            "d",
            "--out",
            "m",
            "--no-augment",
            "--fine-tune",
            "all",
            "--backbone",
            "efficientnet-lite0",
            "--group-by",
            r"^(\w+)_f",
            "--intensity",
            "fixed:0,4095",
            "--val-split",
            "25",
            "--channels",
            "0,1,-",
        ]
    )
    config = _config_from_args(args, "m")
    assert config.augment is False and config.fine_tune == "all"
    assert config.backbone == "efficientnet-lite0" and config.group_by == r"^(\w+)_f"
    assert (config.intensity, config.intensity_range) == ("fixed", (0.0, 4095.0))
    assert config.val_split == 0.25 and config.channel_map == (0, 1, None)
    train_help = parser._subparsers._group_actions[0].choices["train"].format_help()
    assert help_of("head_epochs")[:30] in " ".join(train_help.split())
    with pytest.raises(ValueError, match="regular expression"):
        TrainConfig("d", group_by="(unclosed")
