"""Scorer settings are defined once: what `calibrate` is given is what a `--profile` worker
scores with, and an option the chosen scorer would ignore is refused by name.

e170531: `calibrate --adapt-steps N` was written nowhere a worker read it (the profile's
scorer settings were a hand-written dict without it), so `--profile` workers scored without
the adapted head against thresholds measured with it; the defect vocabulary of a profile
worker came from the command line, not from the profile.

The CLIP cases use the bundled tiny architecture with random weights (no CLIP weights
here): they check that every option reaches the scorer, not what real CLIP scores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from inference.settings import PRESETS, ScorerSettings, SettingsError, flag_name

TINY = "openclip:lw-tiny-vit-64"
EFF = dict(backbone="efficientnet-lite0", image_size=64)
CLIP = dict(method="winclip", backbone=TINY, random_init=True)


def _param_sum(scorer: Any) -> float:
    bb = getattr(scorer, "backbone", None) or scorer.coarse.backbone
    return round(float(sum(p.detach().double().sum() for p in bb.parameters())), 3)


def _backbone(scorer: Any) -> Any:
    return getattr(scorer, "backbone", None) or scorer.coarse.backbone


# option -> (settings that change it from its default, what the built scorer shows of it)
CASES: dict[str, tuple[dict[str, Any], Any]] = {
    "method": ({**CLIP, "method": "winclip+"}, lambda s, d: s.name),
    "backbone": (EFF, lambda s, d: type(_backbone(s)).__name__),
    "weights": ({**EFF, "weights": "WEIGHTS"}, lambda s, d: _param_sum(s)),
    "image_size": ({**EFF, "image_size": 96}, lambda s, d: _backbone(s).image_size),
    "layers": ({**EFF, "layers": (1, 2)}, lambda s, d: _backbone(s).stages),
    "random_init": (CLIP, lambda s, d: _param_sum(s)),
    "precision": ({**CLIP, "precision": "int8"}, lambda s, d: _backbone(s).precision),
    "reference_augment": ({**EFF, "reference_augment": "rotate"}, lambda s, d: s.augment),
    "tiling": ({**EFF, "tiling": False}, lambda s, d: s.tiling),
    "test_views": ({**EFF, "test_views": "flips"}, lambda s, d: (s.views, s.memory_size)),
    "aggregate": ({**EFF, "aggregate": (1, 3)}, lambda s, d: s.aggregate),
    "zoom": ({**EFF, "zoom": True}, lambda s, d: type(s).__name__),
    "zoom_top_k": ({**EFF, "zoom": True, "zoom_top_k": 3}, lambda s, d: s.top_k),
    "zoom_crop": ({**EFF, "zoom": True, "zoom_crop": 0.5}, lambda s, d: s.crop_frac),
    "adapt_steps": ({**EFF, "adapt_steps": 3}, lambda s, d: (s.adapt_steps, s.head is not None)),
    "memory_tolerance": ({**EFF, "memory_tolerance": 0.3}, lambda s, d: s.memory_tolerance),
    "stream_bank": ({**EFF, "stream_bank": 16}, lambda s, d: (s.stream_bank, s.per_camera)),
    # mutual scoring has no profile (calibrate refuses it): these reach a worker built from flags
    "bank_size": ({"method": "mutual", "image_size": 56, "bank_size": 16},
                  lambda s, d: s.bank_size),
    "warmup": ({"method": "mutual", "image_size": 56, "warmup": 4}, lambda s, d: s.warmup),
    "prompts": ({**CLIP, "method": "anomalyclip", "prompts": "PROMPTS"},
                lambda s, d: round(float(s.prompts.normal_ctx.detach().sum()), 4)),
    "class_name": ({**CLIP, "class_name": "bottle"}, lambda s, d: s.class_name),
    "vocabulary": ({**CLIP, "vocabulary": ("dent", "burr", "hole")},
                   lambda s, d: tuple(d.vocabulary.words)),
}


def _flags(s: ScorerSettings) -> list[str]:
    """The command-line flags a person would type for ``s`` (its non-defaults)."""
    out = ["--scorer", s.method]
    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        if f.name == "method" or v == f.default:
            continue
        flag = flag_name(f.name)
        if isinstance(v, bool):
            out.append(flag if v else f"--no-{flag[2:]}")
        else:
            out += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return out


def test_every_setting_has_a_case() -> None:
    assert set(CASES) == {f.name for f in dataclasses.fields(ScorerSettings)}


@pytest.fixture(scope="module")
def normals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from producers.sources import SyntheticConveyor

    out = tmp_path_factory.mktemp("normals")
    for i, im in enumerate(SyntheticConveyor(seed=4, size=(96, 96), defect_rate=0.0).normals(8)):
        cv2.imwrite(str(out / f"{i:02d}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    return out


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """AnomalyCLIP prompts for the tiny random CLIP (untrained: this is about plumbing)."""
    from inference.anomalyclip import PromptLearner, save_prompts
    from inference.clip import OpenCLIPBackbone

    bb = OpenCLIPBackbone(TINY.removeprefix("openclip:"), random_init=True)
    path = tmp_path_factory.mktemp("prompts") / "p.safetensors"
    save_prompts(PromptLearner(bb, seed=3), path, bb.arch)
    return str(path)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """EfficientNet-Lite0 weights that differ from the packaged ones (first tensor halved)."""
    import torch

    from inference.backbones import efficientnet_lite0_weights_path

    sd = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    first = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim == 4)
    sd[first] = sd[first] * 0.5
    path = tmp_path_factory.mktemp("w") / "lite0-halved.pth"
    torch.save(sd, path)
    return str(path)


def _profile_worker_scorer(profile: Path) -> tuple[Any, Any]:
    """What `linewatch worker --profile` builds: the same assembly code, without Kafka."""
    from consumers.assembly import StartingBeliefs, WorkerSetup, describer

    b = StartingBeliefs.build(WorkerSetup(profile=str(profile), drift_window=0), "w-settings")
    return b.scorer, describer(b.settings, b.scorer)


def _direct(settings: ScorerSettings, refs: list[np.ndarray]) -> tuple[Any, Any]:
    from consumers.assembly import describer

    scorer = settings.build("cpu")
    scorer.fit(refs)
    return scorer, describer(settings, scorer)


@pytest.mark.parametrize("option", list(CASES))
def test_a_setting_given_to_calibrate_reaches_the_profile_workers_scorer(
        option: str, normals: Path, other_weights: str, prompt_file: str, tmp_path: Path) -> None:
    from linewatch.cli import main
    from linewatch.images import load_folder

    given, observe = CASES[option]
    given = {k: ({"WEIGHTS": other_weights, "PROMPTS": prompt_file}.get(v, v) if isinstance(v, str) else v)
             for k, v in given.items()}
    settings = ScorerSettings(**given)
    # the same settings with only this option at its default: the option must show
    baseline = None if option == "prompts" else dataclasses.replace(  # no prompts: no anomalyclip
        settings, **{option: ScorerSettings.__dataclass_fields__[option].default})
    if option in ("backbone",):
        baseline = ScorerSettings()  # dinov2-s at its default size
    if option in ("random_init", "prompts"):
        baseline = None  # a CLIP backbone without weights, or anomalyclip without prompts, does not build
    if option == "method":
        baseline = dataclasses.replace(settings, method="winclip")

    refs = load_folder(normals)
    if settings.method == "mutual":
        from consumers.assembly import StartingBeliefs, WorkerSetup

        setup = WorkerSetup(scorer=given, drift_window=0)  # mutual starts with no references
        got = observe(StartingBeliefs.build(setup, "w-settings").scorer, None)
    else:
        out = tmp_path / "line"
        rc = main(["calibrate", "--normals", str(normals), "--out", str(out), "--shots", "2",
                   "--pseudo", "0", "--no-progress", "--torch-threads", "2", *_flags(settings)])
        assert rc == 0
        got = observe(*_profile_worker_scorer(out))
    want = observe(*_direct(settings, refs[:2]))
    assert got == want, (option, got, want)
    if baseline is not None:
        assert observe(*_direct(baseline, refs[:2])) != want, f"{option} has no visible effect"


@pytest.mark.parametrize(("flags", "named"), [
    (["--backbone", TINY, "--random-init", "--scorer", "winclip", "--layers", "5,8"], "--layers"),
    (["--backbone", TINY, "--random-init", "--scorer", "winclip", "--image-size", "224"],
     "--image-size"),
    (["--backbone", "efficientnet-lite0", "--random-init"], "--random-init"),
    (["--class-name", "bottle"], "--class-name"),
    (["--defect-vocabulary", "dent,hole"], "--defect-vocabulary"),
    (["--zoom-top-k", "3"], "--zoom-top-k"),
    (["--backbone", TINY, "--random-init", "--scorer", "winclip", "--adapt-steps", "5"],
     "--adapt-steps"),
    (["--backbone", TINY, "--random-init", "--scorer", "winclip", "--reference-augment", "rotate"],
     "--reference-augment"),
    (["--scorer", "noop", "--image-size", "64"], "--image-size"),
    (["--backbone", TINY, "--random-init", "--scorer", "winclip", "--defect-vocabulary", "dent"],
     "--defect-vocabulary"),  # one word: a worker could not build its vocabulary
    (["--zoom", "--zoom-crop", "0.95"], "--zoom-crop"),
    (["--bank-size", "16"], "--bank-size"),  # patch-knn has no bank
    (["--scorer", "mutual", "--zoom"], "--zoom"),
    (["--backbone", TINY, "--random-init", "--scorer", "winclip+", "--memory-tolerance", "0.02"],
     "--memory-tolerance"),
    (["--scorer", "mutual", "--warmup", "40"], "--warmup"),  # above the bank of 32
    (["--scorer", "mutual", "--backbone", TINY, "--random-init"], "mutual scoring is implemented"),
    (["--scorer", "mutual"], "needs no profile"),
    (["--scorer", "mutual", "--test-views", "flips"], "--test-views"),
    (["--test-views", "flips", "--zoom"], "--zoom"),  # zoom's crops see one view
    (["--test-views", "flips", "--stream-bank", "16"], "--stream-bank"),  # a bank holds one view
    (["--test-views", "flips", "--adapt-steps", "3"], "--adapt-steps"),
])
def test_an_option_the_scorer_would_ignore_is_refused_by_name(flags: list[str], named: str,
                                                               tmp_path: Path, capsys) -> None:
    from linewatch.cli import main

    rc = main(["calibrate", "--normals", str(tmp_path), "--out", str(tmp_path / "p"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and named in err, err


def test_mutual_scoring_refuses_options_for_a_memory_it_will_never_have(tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    """Zero-shot mutual scoring has a memory only when operators' verdicts fill it: a worker
    that does not learn from them, and `evaluate --shots 0`, refuse what would shape it."""
    from linewatch.cli import main
    from linewatch.wire.messages import LABEL_KEY_ENV

    monkeypatch.delenv(LABEL_KEY_ENV, raising=False)
    base = ["worker", "--bootstrap-servers", "127.0.0.1:1", "--scorer", "mutual", "--image-size", "56",
            "--no-learn-from-labels"]
    for flag in ("--memory-tolerance", "--false-alarm-rate"):
        assert main([*base, flag, "0.05"]) == 2
        err = capsys.readouterr().err
        assert flag in err and "does not learn from verdicts" in err, err
    assert main(["evaluate", "--data", str(tmp_path), "--method", "mutual", "--shots", "0",
                 "--memory-tolerance", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "--memory-tolerance" in err and "--shots 0" in err, err


def test_a_profile_worker_refuses_a_flag_that_contradicts_its_profile(normals: Path,
                                                                      tmp_path: Path, capsys) -> None:
    from linewatch.cli import main

    out = tmp_path / "line"
    assert main(["calibrate", "--normals", str(normals), "--out", str(out), "--shots", "2",
                 "--pseudo", "0", "--no-progress", "--backbone", "efficientnet-lite0",
                 "--image-size", "64"]) == 0
    capsys.readouterr()
    base = ["worker", "--bootstrap-servers", "127.0.0.1:1", "--profile", str(out),
            "--no-learn-from-labels"]
    assert main([*base, "--image-size", "96"]) == 2
    err = capsys.readouterr().err
    assert "--image-size 96 conflicts with the profile" in err and "image_size=64" in err, err
    assert main([*base, "--references", str(normals)]) == 2
    assert "--references conflicts with --profile" in capsys.readouterr().err
    assert main([*base, "--false-alarm-rate", "0.05"]) == 2
    assert "--false-alarm-rate conflicts with --profile" in capsys.readouterr().err


def test_a_flag_equal_to_the_profiles_setting_is_no_conflict(normals: Path, tmp_path: Path) -> None:
    from consumers.assembly import StartingBeliefs, WorkerSetup
    from linewatch.cli import main

    out = tmp_path / "line"  # calibrated on the default backbone, recorded as "default"
    assert main(["calibrate", "--normals", str(normals), "--out", str(out), "--shots", "2",
                 "--pseudo", "0", "--no-progress", "--image-size", "56"]) == 0
    b = StartingBeliefs.build(WorkerSetup(scorer={"image_size": 56, "backbone": "dinov2-s"},
                                          profile=str(out), drift_window=0), "w")
    assert b.settings.resolved_backbone == "dinov2-s" and b.settings.image_size == 56


def test_holdout_beside_thresholds_by_hand_is_the_drift_reference(normals: Path) -> None:
    """--holdout with both thresholds given was read by nothing: drift was off and the folder
    silently ignored. Now it is drift's reference, and the thresholds stay as given (no
    recalibration after verdicts). One threshold alone is refused, not silently calibrated
    (or, for noop, silently defaulted)."""
    from consumers.assembly import SetupError, StartingBeliefs, WorkerSetup

    small = {"backbone": "efficientnet-lite0", "image_size": 64}
    b = StartingBeliefs.build(WorkerSetup(scorer=small, references=str(normals), holdout=str(normals),
                                          alert_threshold=0.5, review_threshold=0.3), "w")
    assert b.drift is not None and b.holdout is not None
    assert (b.thresholds.alert, b.thresholds.review) == (0.5, 0.3)
    # a verdict grows the memory: the thresholds stay as given, but the held-out frames are
    # rescored so drift compares live scores with theirs under the same memory
    from consumers.labels import ReferenceLearner, Verdict
    from linewatch.wire import Label

    learner = ReferenceLearner(b.scorer, b.refs, b.holdout, "w-hand", recalibrate=False)
    before = b.holdout.scores(b.scorer)
    odd = b.holdout.frames[-1]  # not among the 4 references: its own score drops to ~0
    learner.apply([Verdict(Label(item_id="c:1", camera="c", line="l", seq=1, verdict="normal",
                                 operator="op"), odd)])
    res = learner.learn()
    assert res.added == 1 and res.thresholds is None and res.holdout_scores is not None
    assert res.holdout_scores != before
    for partial in (dict(alert_threshold=0.5), dict(review_threshold=0.3)):
        for scorer in (small, {"method": "noop"}):
            with pytest.raises(SetupError, match="both --alert-threshold and --review-threshold"):
                StartingBeliefs.build(WorkerSetup(scorer=scorer, references=str(normals),
                                                  holdout=str(normals), **partial), "w")
    with pytest.raises(SetupError, match="--drift-window 0"):
        StartingBeliefs.build(WorkerSetup(scorer=small, references=str(normals), holdout=str(normals),
                                          alert_threshold=0.5, review_threshold=0.3,
                                          drift_window=0), "w")
    noop = StartingBeliefs.build(WorkerSetup(scorer={"method": "noop"}, holdout=str(normals),
                                             alert_threshold=0.5, review_threshold=0.3), "w")
    assert noop.drift is not None  # the noop scorer runs drift too: the benchmark's peer


def test_defect_words_reach_a_zoomed_clip_scorer() -> None:
    """patch-knn with ROI zoom on a CLIP backbone: the words model sits under the zoom."""
    from consumers.assembly import describer

    s = ScorerSettings(backbone=TINY, random_init=True, zoom=True, vocabulary=("dent", "hole"))
    d = describer(s, s.build("cpu"))
    assert d is not None and d.vocabulary.words == ["dent", "hole"]


def test_a_schema_1_profile_loads_without_the_options_its_scorer_ignored(
        normals: Path, tmp_path: Path, caplog) -> None:
    """Before settings were validated, calibrate recorded class_name for every method; such a
    profile loads (as its worker then ran: without it), with a warning naming what was left out."""
    import json

    from inference.profile import LineProfile
    from linewatch.cli import main

    out = tmp_path / "line"
    assert main(["calibrate", "--normals", str(normals), "--out", str(out), "--shots", "2",
                 "--pseudo", "0", "--no-progress", "--backbone", "efficientnet-lite0",
                 "--image-size", "64"]) == 0
    jpath = LineProfile.paths(out)[0]
    meta = json.loads(jpath.read_text())
    meta["schema"] = 1
    meta["scorer"] = {"method": "patch-knn", "backbone": "efficientnet-lite0", "image_size": 64,
                      "layers": None, "class_name": "bottle", "weights": None,
                      "reference_augment": "none", "zoom": False, "zoom_top_k": 2,
                      "zoom_crop": 0.35, "precision": "fp32"}
    jpath.write_text(json.dumps(meta))
    p = LineProfile.load(out)
    # tiling and the memory's novelty filter came later: the profile's thresholds were
    # measured on squashed frames against a whole memory
    assert p.scorer == ScorerSettings(backbone="efficientnet-lite0", image_size=64, tiling=False,
                                      memory_tolerance=0.0)
    assert "class_name" in caplog.text


def test_settings_round_trip_and_refuse_unknown_keys() -> None:
    s = ScorerSettings(**CLIP, class_name="bottle", vocabulary=("dent", "hole"))
    assert ScorerSettings.from_dict(s.to_dict()) == s
    with pytest.raises(SettingsError, match="unknown scorer setting"):
        ScorerSettings.from_dict({**s.to_dict(), "temperature": 0.1})
    old = {k: v for k, v in ScorerSettings().to_dict().items() if k not in ("tiling", "memory_tolerance")}
    assert ScorerSettings.from_dict(old).tiling is False  # written before tiling: squashed, as calibrated
    assert ScorerSettings.from_legacy_dict(old)[0].tiling is False
    # and before the memory's novelty filter: its verdicts were learned whole
    assert ScorerSettings.from_dict(old).memory_tolerance == 0.0
    # what a profile stores from now on is the tolerance spelled out, so a later change of
    # the backbone's default does not change the memory its thresholds were measured with
    built = ScorerSettings(backbone="efficientnet-lite0", image_size=64).build()
    assert built.settings.to_dict()["memory_tolerance"] == built.memory_tolerance == 0.0
    from inference.settings import MEMORY_TOLERANCE_DEFAULTS
    assert ScorerSettings().resolved().memory_tolerance == MEMORY_TOLERANCE_DEFAULTS["dinov2-s"] > 0
    # mutual scoring's few-shot memory has the same filter and default
    default = MEMORY_TOLERANCE_DEFAULTS["dinov2-s"]
    assert ScorerSettings(method="mutual").resolved().memory_tolerance == default
    built = ScorerSettings(method="mutual", image_size=56).build()
    assert built.memory_tolerance == built.settings.to_dict()["memory_tolerance"] == default
    with pytest.raises(SettingsError, match="mapping"):
        ScorerSettings.from_legacy_dict(["patch-knn"])  # type: ignore[arg-type]
    for bad in ({"layers": "abc"}, {"vocabulary": 5}, {"zoom": True, "zoom_top_k": "3"},
                {"backbone": 5}, {"zoom": "yes"}, {"weights": 5}, {"layers": [1.9]},
                {"backbone": TINY, "random_init": True, "vocabulary": "ab"},
                {"backbone": TINY, "random_init": True, "class_name": 5}, {"aggregate": [2]},
                {"aggregate": [1, 1]}, {"aggregate": []}, {"aggregate": "1,3"}, {"tiling": "yes"},
                {"zoom": True, "zoom_crop": "0.5"}, {"zoom": True, "zoom_crop": True},
                {"memory_tolerance": "0.1"}, {"memory_tolerance": -0.1}, {"memory_tolerance": 0.9}):
        with pytest.raises(SettingsError):  # a profile's wrong types: a named error, not a crash
            ScorerSettings.from_dict({"backbone": "efficientnet-lite0", **bad})


def test_a_preset_is_a_shorthand_that_typed_flags_override() -> None:
    """`--preset quality` gives its settings (what a profile then stores); a flag typed beside
    it wins; an option the chosen scorer would ignore is refused naming the preset."""
    from linewatch.cli import CliError, build_parser
    from linewatch.cli.models import scorer_settings

    def settings(*flags: str) -> ScorerSettings:
        return scorer_settings(build_parser().parse_args(["evaluate", "--data", "x", *flags]))

    assert settings("--preset", "quality") == ScorerSettings(**PRESETS["quality"])
    assert settings("--preset", "quality", "--image-size", "336").image_size == 336
    assert settings().image_size is None  # no preset: the defaults
    with pytest.raises(CliError, match="--preset quality gives --image-size"):
        settings("--preset", "quality", "--scorer", "winclip")
