"""Putting a worker together: scorer, thresholds, drift, learner, profile watcher.

The command line only parses flags into a :class:`WorkerSetup` and a
:class:`~consumers.config.WorkerConfig`; :func:`build_worker` does the rest, so a
test or another program builds exactly the worker ``linewatch worker`` runs.
Every problem a person can fix (a missing folder, a flag the profile contradicts,
a missing key) is a :class:`SetupError` that says what to do, raised before the
worker joins its consumer group.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from consumers.config import WorkerConfig
from inference import set_torch_threads
from inference.calibration import DEFAULT_EXPECTED_ANOMALY_RATE
from inference.settings import ScorerSettings, SettingsError, flag_name

if TYPE_CHECKING:  # kept light: the command line reads WorkerSetup's defaults for its --help
    import numpy as np

    from inference.calibration import CalibrationFrames, Thresholds

log = logging.getLogger("linewatch")


class SetupError(RuntimeError):
    """A worker cannot be built as asked; the message says which input and what to do."""


@dataclass(frozen=True)
class WorkerSetup:
    """How a worker's beliefs are set up (its Kafka settings are :class:`WorkerConfig`).

    ``scorer`` holds only the scorer options that were given: without a profile they
    complete :class:`ScorerSettings`' defaults; with one they must agree with it.
    """

    scorer: Mapping[str, Any] = field(default_factory=dict)
    profile: str | None = None  # a line profile from `linewatch calibrate`
    device: str = "cpu"
    references: str | None = None  # folder of normal images (without a profile)
    shots: int | None = None  # None here and below: FOLDER_DEFAULTS (they are not for profiles)
    holdout: str | None = None  # other normals: thresholds and the drift reference
    alert_threshold: float | None = None
    review_threshold: float | None = None
    false_alarm_rate: float | None = None
    review_rate: float | None = None
    drift_window: int = 100
    drift_thresholds: tuple[str, ...] = ()  # "statistic=value" overrides
    learn_from_labels: bool | None = None  # None: on when the label key is set
    max_learned_normals: int = 200
    expected_anomaly_rate: float | None = None  # mutual (zero-shot): sets uncalibrated thresholds
    torch_threads: int | None = None
    inject_faults: str | None = None  # tests and benchmarks only (inference/faults.py)


# settings a worker set up from folders uses; a profile holds its own
FOLDER_DEFAULTS: dict[str, Any] = {"shots": 4, "false_alarm_rate": 0.01, "review_rate": 0.1,
                                   "expected_anomaly_rate": DEFAULT_EXPECTED_ANOMALY_RATE}
_FOLDERS_ONLY = ("references", "holdout", "alert_threshold", "review_threshold", *FOLDER_DEFAULTS)


def _folder(setup: WorkerSetup, name: str) -> Any:
    v = getattr(setup, name)
    return FOLDER_DEFAULTS[name] if v is None else v


def build_worker(setup: WorkerSetup, config: WorkerConfig):
    """The worker ``setup`` describes; ``config.thresholds`` is filled in here."""
    from consumers.worker import Worker
    from inference.backbones import BackboneUnavailable
    from inference.clip import ClipUnavailable
    from inference.profile import ProfileError
    from linewatch.images import ImageReadError
    from linewatch.wire import LABEL_KEY_ENV
    from monitoring import metrics
    from monitoring.drift import DriftConfigError

    key = label_key(setup)  # settings errors before the model loads
    set_torch_threads(setup.torch_threads)
    try:
        b = StartingBeliefs.build(setup, config.worker_id)
    except (SettingsError, ProfileError, DriftConfigError, ImageReadError, BackboneUnavailable,
            ClipUnavailable, ValueError) as exc:
        raise SetupError(str(exc)) from None
    th, scorer = b.thresholds, b.scorer
    metrics.THRESHOLDS_CALIBRATED.labels(worker=config.worker_id).set(b.stream_thresholds is None)
    if th.review > th.alert:
        raise SetupError(f"review threshold {th.review} is above the alert threshold {th.alert}")
    metrics.REFERENCE_IMAGES.labels(worker=config.worker_id).set(len(b.refs))
    info = {"scorer": scorer.name, "version": _version(), **model_info(b.settings),
            "profile": b.fingerprint[:12] if b.fingerprint else _profile_id(scorer.name, b.refs, th)}
    if hasattr(scorer, "map_gate"):
        # lazy cascade: full window maps only for frames that can reach review or alert
        scorer.map_gate = th.review
        log.info("full anomaly maps only for frames scoring >= %.4f (the review threshold)", th.review)
    describe = describer(b.settings, scorer)
    if getattr(scorer, "per_camera", False):  # banks (and thresholds) per camera: as many as it tracks
        scorer.max_streams = config.max_cameras
        if getattr(scorer, "stream_bank", 0):
            log.info("--stream-bank %d: each camera's frames are also compared with its last %d "
                     "frames that the references alone did not alert on, once it has %d; a frame "
                     "scores at most what the references alone give it, so the thresholds keep "
                     "their bound",
                     scorer.stream_bank, scorer.stream_bank, scorer.warmup)
        if b.stream_thresholds is not None:
            b.stream_thresholds.max_streams = config.max_cameras
        if setup.inject_faults:
            raise SetupError("--inject-faults wraps the scorer in one that knows nothing of cameras' "
                             "banks; it is implemented for scorers without them (not mutual, not "
                             "--stream-bank)")
    if setup.inject_faults:
        from inference.faults import FaultyScorer

        try:
            scorer = FaultyScorer(scorer, setup.inject_faults)
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        log.warning("--inject-faults %s: this worker's model fails on purpose (tests only)",
                    setup.inject_faults)
    learner = None
    if key is not None:
        from consumers.labels import ReferenceLearner

        # thresholds given by hand stay as given; calibrated ones are recalibrated. Either way
        # the held-out frames are rescored, so drift's score reference follows the memory
        recalibrate = setup.alert_threshold is None
        try:
            learner = ReferenceLearner(scorer, b.refs, b.holdout, config.worker_id,
                                       setup.max_learned_normals, _folder(setup, "false_alarm_rate"),
                                       _folder(setup, "review_rate"), recalibrate=recalibrate,
                                       calibrate_from_verdicts=b.stream_thresholds is not None)
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        if b.stream_thresholds is not None:
            # few-shot from the moment its thresholds can be calibrated (the learner says when):
            # until then mutual scoring measured better than few-shot on those normals (README)
            scorer.few_shot_after = None
            log.warning("thresholds are uncalibrated until operators confirm %d normal frames "
                        "(every second one is kept out of the memory to calibrate on); then this "
                        "worker scores few-shot against the other %d, with calibrated thresholds",
                        2 * learner.calibration_needed, learner.calibration_needed)
        elif not (b.holdout and recalibrate):
            log.info("operator verdicts grow the reference memory; thresholds stay fixed (they "
                     "are recalibrated only when calibrated from --holdout)")
    elif b.stream_thresholds is not None:
        # what shapes the thresholds and the memory that operators' confirmed normals fill
        given = [n for n in ("false_alarm_rate", "review_rate") if getattr(setup, n) is not None]
        given += ["memory_tolerance"] if setup.scorer.get("memory_tolerance") is not None else []
        if given:
            raise SetupError(f"{flag_name(given[0])} shapes what operators' confirmed normals "
                             f"teach, and this zero-shot worker does not learn from verdicts "
                             f"({LABEL_KEY_ENV} is not set, or --no-learn-from-labels): remove it")
        log.warning("zero-shot without learning from verdicts: thresholds stay uncalibrated and "
                    "scoring stays mutual (set %s to let operators' verdicts calibrate them)",
                    LABEL_KEY_ENV)
    if b.drift is None:
        log.warning("drift monitoring is off: it needs --holdout (the calibration frames are its "
                    "reference)%s", "" if setup.drift_window else " and a --drift-window above 0")
    watcher = None
    if setup.profile:
        from consumers.profiles import ProfileWatcher, load_profile

        path = setup.profile

        def reload() -> Any:  # in the watcher's thread: the words model is built there too
            loaded = load_profile(path, setup.device, setup.drift_window, b.drift_overrides)
            loaded.describe = describer(loaded.profile.scorer, loaded.scorer)
            loaded.info = model_info(loaded.profile.scorer)
            return loaded

        watcher = ProfileWatcher(path, reload, b.fingerprint or "")
    return Worker(dataclasses.replace(config, thresholds=th), scorer, b.drift, learner, watcher,
                  describe=describe, info=info, probe=b.refs[0] if b.refs else None, label_key=key,
                  stream_thresholds=b.stream_thresholds)


@dataclass
class StartingBeliefs:
    """What the worker starts out believing: the fitted scorer and its thresholds, from a
    profile or from folders (``StartingBeliefs.build``)."""

    settings: ScorerSettings
    scorer: Any
    thresholds: Thresholds
    refs: list[np.ndarray]
    holdout: CalibrationFrames | None  # calibrated from --holdout: recalibrated after verdicts
    drift: Any
    drift_overrides: dict[str, float]
    fingerprint: str | None = None
    stream_thresholds: Any = None  # zero-shot: each camera's uncalibrated thresholds

    @classmethod
    def build(cls, setup: WorkerSetup, worker_id: str) -> StartingBeliefs:
        from inference.calibration import Thresholds
        from monitoring.drift import parse_thresholds

        overrides = parse_thresholds(setup.drift_thresholds)
        if setup.profile:
            return cls._from_profile(setup, overrides)
        settings = ScorerSettings(**setup.scorer)
        if setup.expected_anomaly_rate is not None and settings.method != "mutual":
            raise SetupError("--expected-anomaly-rate sets zero-shot thresholds: it is for --method "
                             "mutual; this worker calibrates from --holdout or takes thresholds")
        if (setup.alert_threshold is None) != (setup.review_threshold is None):
            raise SetupError("give both --alert-threshold and --review-threshold, or neither (then "
                             "both are calibrated from --holdout)")
        if settings.method == "noop":
            log.warning("scorer 'noop' scores nothing: every frame is 'normal'. Use it only to "
                        "measure the pipeline's own overhead.")
            th = Thresholds(alert=setup.alert_threshold if setup.alert_threshold is not None else 1.0,
                            review=setup.review_threshold if setup.review_threshold is not None else 0.5,
                            n_normals=0, guaranteed=False)
            scorer = settings.build(setup.device)
            holdout, _, drift = _holdout(setup, scorer, overrides, for_thresholds=False)
            return cls(settings, scorer, th, [], holdout, drift, overrides)
        if settings.method == "mutual":
            return cls._zero_shot(setup, settings, overrides)
        return cls._from_folders(setup, settings, overrides)

    @classmethod
    def _zero_shot(cls, setup: WorkerSetup, settings: ScorerSettings,
                   overrides: dict[str, float]) -> StartingBeliefs:
        """Mutual scoring: no references needed, thresholds from each camera's own scores."""
        from inference.calibration import WARM_UP, StreamThresholds

        for name in ("references", "shots", "holdout", "alert_threshold", "review_threshold"):
            if getattr(setup, name) is not None:
                raise SetupError(f"{flag_name(name)} does not go with --method mutual, which starts "
                                 "from nothing: each camera is scored by its own recent frames, with "
                                 "thresholds from its own scores (--expected-anomaly-rate), until "
                                 "operators confirm normals. A line with normal images and a holdout "
                                 "is patch-knn's (few-shot, calibrated thresholds)")
        scorer = settings.build(setup.device)
        scorer.fit([])
        rate = _folder(setup, "expected_anomaly_rate")
        stream = StreamThresholds(rate)
        log.warning("zero-shot (mutual), no references: each camera's frames go to review until %d "
                    "of its frames are in its bank and %d scores set its UNCALIBRATED thresholds "
                    "(expected anomaly rate %g)", settings.warmup, stream.min_scores, rate)
        return cls(settings, scorer, WARM_UP, [], None, None, overrides, stream_thresholds=stream)

    @classmethod
    def _from_profile(cls, setup: WorkerSetup, overrides: dict[str, float]) -> StartingBeliefs:
        from consumers.profiles import load_profile
        from inference.profile import LineProfile

        given = [n for n in _FOLDERS_ONLY if getattr(setup, n) is not None]
        if given:
            raise SetupError(f"{flag_name(given[0])} conflicts with --profile: the profile holds the "
                             "references, thresholds and rates it was calibrated with; remove it")
        path = str(setup.profile)
        fingerprint = LineProfile.fingerprint(path)
        profile = LineProfile.load(path)
        settings = profile.scorer
        # a flag that builds the same scorer as the profile's setting (dinov2-s, or 224 px,
        # where the profile says "default") is no conflict: compare with defaults spelled out
        asked = dataclasses.replace(settings, **setup.scorer).resolved()
        conflicts = asked.differences(settings.resolved())
        if conflicts:
            k = conflicts[0]
            raise SetupError(f"{flag_name(k)} {setup.scorer.get(k)!r} conflicts with the profile "
                             f"{path}, calibrated with {k}={getattr(settings, k)!r}: a worker "
                             "scores with the profile's settings; remove the flag or calibrate again")
        loaded = load_profile(path, setup.device, setup.drift_window, overrides,
                              preloaded=(profile, fingerprint))
        th = loaded.thresholds
        log.info("profile %s: %d reference images; thresholds alert=%.4f review=%.4f", setup.profile,
                 len(loaded.references), th.alert, th.review)
        return cls(loaded.profile.scorer, loaded.scorer, th, loaded.references, None, loaded.drift,
                   overrides, loaded.fingerprint)

    @classmethod
    def _from_folders(cls, setup: WorkerSetup, settings: ScorerSettings,
                      overrides: dict[str, float]) -> StartingBeliefs:
        from inference.calibration import Thresholds, thresholds_from_normals
        from linewatch.images import load_folder

        if not setup.references:
            raise SetupError("--references DIR is required: a folder of normal images of this line "
                             "(or --profile PROFILE from `linewatch calibrate`)")
        refs = load_folder(setup.references, limit=_folder(setup, "shots"), what="--references")
        hand = setup.alert_threshold is not None  # both or neither (checked in build)
        if not hand and not setup.holdout:
            raise SetupError("thresholds: give --holdout DIR (normal images, not the references) "
                             "to calibrate from, or both --alert-threshold and --review-threshold")
        scorer = settings.build(setup.device)
        scorer.fit(refs)
        holdout, results, drift = _holdout(setup, scorer, overrides, for_thresholds=not hand)
        if hand:
            th = Thresholds(setup.alert_threshold, setup.review_threshold, 0, False)  # type: ignore[arg-type]
        else:
            th = thresholds_from_normals([r.score for r in results], _folder(setup, "false_alarm_rate"),
                                         _folder(setup, "review_rate"))
        log.info("%d reference images; thresholds alert=%.4f review=%.4f (%d held-out normals)",
                 len(refs), th.alert, th.review, th.n_normals)
        return cls(settings, scorer, th, refs, holdout, drift, overrides)


def _holdout(setup: WorkerSetup, scorer: Any, overrides: dict[str, float], for_thresholds: bool
             ) -> tuple[CalibrationFrames | None, list, Any]:
    """The --holdout frames (held-out normals, never the references), their results and the
    drift monitor measured against them. The frames are kept: after verdicts they are rescored
    without the backbone, for thresholds (when calibrated from them) and drift's reference.
    With thresholds given (or a noop scorer) they are only drift's reference."""
    from inference.calibration import CalibrationFrames
    from linewatch.images import load_folder

    if not setup.holdout:
        return None, [], None
    if not for_thresholds and not setup.drift_window:
        raise SetupError("--holdout with both thresholds given is drift's reference, and "
                         "--drift-window 0 turns drift off: drop one of them")
    holdout = CalibrationFrames(load_folder(setup.holdout, what="--holdout"))
    results = holdout.results(scorer)
    return holdout, results, drift_monitor(setup.drift_window, overrides, holdout.frames, results)


def label_key(setup: WorkerSetup) -> bytes | None:
    """The label-signing key when this worker learns from operators' verdicts, else None."""
    from linewatch.wire import LABEL_KEY_ENV
    from linewatch.wire import label_key as key_from_env

    try:
        key = key_from_env()
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    if setup.scorer.get("method") == "noop":
        if setup.learn_from_labels:
            raise SetupError("--learn-from-labels: the noop scorer has no reference memory to grow")
        return None
    if setup.learn_from_labels is False:
        log.info("learning from operators' verdicts: off (--no-learn-from-labels)")
        return None
    if key is None:
        if setup.learn_from_labels:
            raise SetupError(f"--learn-from-labels needs {LABEL_KEY_ENV}: the key the review service "
                             "signs labels with (workers apply only signed labels)")
        log.warning("learning from operators' verdicts: off, because %s is not set (set it to the "
                    "review service's key to learn from verdicts)", LABEL_KEY_ENV)
        return None
    log.info("learning from operators' verdicts signed with %s", LABEL_KEY_ENV)
    return key


def describer(settings: ScorerSettings, scorer: Any) -> Callable[[np.ndarray], str] | None:
    """Defect words on flagged regions when the scorer carries a CLIP text model, else None
    (the settings refuse a vocabulary without one)."""
    backbone = getattr(scorer, "backbone", None) or getattr(getattr(scorer, "coarse", None),
                                                            "backbone", None)  # ROI zoom
    if backbone is None or not hasattr(backbone, "text_direction"):
        log.info("no CLIP text model: explanations locate defects but do not name them")
        return None
    from inference.explain import DEFAULT_VOCABULARY, DefectVocabulary, words_sentence

    words = [w for w in (settings.vocabulary or ()) if w.strip()] or DEFAULT_VOCABULARY
    try:
        vocab = DefectVocabulary(backbone, words, class_name=settings.class_name)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    return _Describe(vocab, words_sentence)


class _Describe:
    """A flagged crop -> a sentence of defect words (keeps its vocabulary inspectable)."""

    def __init__(self, vocabulary: Any, sentence: Callable[[Any], str]) -> None:
        self.vocabulary, self._sentence = vocabulary, sentence

    def __call__(self, crop: np.ndarray) -> str:
        return self._sentence(self.vocabulary.describe([crop])[0])


def drift_monitor(window: int, overrides: dict[str, float], holdout: list, results: list):
    """Drift against the calibration frames, or None when ``window`` is 0."""
    from monitoring import metrics
    from monitoring.drift import DriftMonitor, DriftReference

    if not window:
        return None
    ref = DriftReference.from_frames(holdout, [r.score for r in results], [r.embedding for r in results])
    monitor = DriftMonitor(ref, window=window, thresholds=overrides)
    metrics.publish_reference(ref)
    log.info("drift: %d-frame windows per camera against %d calibration frames%s", window, ref.n,
             "" if ref.embeddings is not None else " (this scorer has no embedding drift)")
    return monitor


def model_info(s: ScorerSettings) -> dict[str, str]:
    """The model labels of ``linewatch_worker_info`` (they follow profile reloads)."""
    return {"backbone": s.resolved_backbone or "none", "image_size": str(s.image_size or "default"),
            "layers": ",".join(map(str, s.layers)) if s.layers else "default"}


def _profile_id(scorer: str, refs: list, th: object) -> str:
    """A short fingerprint of what decides: scorer, reference pixels, thresholds (for dashboards)."""
    h = hashlib.sha256(f"{scorer}|{th!r}".encode())
    for im in refs:
        h.update(im.tobytes())
    return h.hexdigest()[:12]


def _version() -> str:
    from linewatch import __version__

    return __version__
