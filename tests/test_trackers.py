"""Experiment trackers end to end: a tiny `fit` logs to TensorBoard, wandb (offline), MLflow (SQLite store),
trackio (local) and Aim, and each tracker's own reader finds every metrics.jsonl value at its step, the config,
the predictions tables and the run summary. A tracker that fails (starting, logging, a table, finishing) is
warned about once and dropped while training and the other trackers go on; after a fit that raised the next
one finishes the runs it left open; a resumed run continues the same tracker runs. Plus the pieces: config
flattening, MFU, per-group learning rates, Markdown escaping, checks before training.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from accelerate.tracking import GeneralTracker

from helpers import small_config
from llava_loop import Callback, Loop, LoopConfig
from llava_loop.loggers import Throughput, gpu_peak_tflops, learning_rate_logs, model_flops_per_token, read_metrics
from llava_loop.testing import synthetic_vqa, tiny_llava
from llava_loop.trackers import TrackerLogger, check_trackers, markdown_table, tracker_config

QUIET = {  # no terminal capture, no system-metrics threads: the tests stay fast and pytest keeps stdout
    "wandb": {"settings": {"console": "off", "x_disable_stats": True}},
    "trackio": {"auto_log_cpu": False, "auto_log_gpu": False},
    "aim": {"capture_terminal_logs": False, "system_tracking_interval": None},
}
ALL = ["tensorboard", "wandb", "mlflow", "trackio", "aim"]


class Recorder(GeneralTracker):
    """A custom Accelerate tracker that records what it gets, and raises in ``fail_in`` (from ``fail_step``)."""

    name = "recorder"
    requires_logging_directory = False

    def __init__(self, name: str = "recorder", fail_in: str | None = None, fail_step: int = 0):
        super().__init__()
        self.name, self.fail_in, self.fail_step = name, fail_in, fail_step
        self.config: dict | None = None
        self.logged: list[tuple[int, dict]] = []
        self.tables: list[tuple[int, list, list]] = []
        self.finished = False

    @property
    def tracker(self):
        return self

    def _maybe_fail(self, where: str, step: int = 0) -> None:
        if self.fail_in == where and step >= self.fail_step:
            raise RuntimeError(f"{self.name} broke in {where}")

    def start(self):
        self._maybe_fail("start")

    def store_init_configuration(self, values):
        self.config = dict(values)

    def log(self, values, step=None, **kwargs):
        self._maybe_fail("log", step)
        self.logged.append((step, dict(values)))

    def log_table(self, table_name, columns=None, data=None, dataframe=None, step=None, **kwargs):
        self._maybe_fail("table", step)
        self.tables.append((step, columns, data))

    def finish(self):
        self._maybe_fail("finish")
        self.finished = True


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Every tracker offline and inside the test's folders: wandb offline (its caches too), trackio's
    TRACKIO_DIR (read when trackio is first imported), no MLflow tracking URI, MLflow HTTP without retries."""
    home = tmp_path_factory.mktemp("tracker_home")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            mp.setenv(key, str(home / key.lower()))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        if "trackio" not in sys.modules:
            mp.setenv("TRACKIO_DIR", str(home / "trackio"))
        import trackio.utils

        yield {"trackio_dir": Path(trackio.utils.TRACKIO_DIR)}


def tracker_run(out, *, report_to, callbacks=None, **settings) -> Loop:
    """A 4-step fit of the tiny LLaVA (eval every 2 steps on 4 samples with images, a projector group)."""
    model, processor = tiny_llava(seed=0)
    base = dict(
        max_steps=4, log_steps=1, eval_steps=2, max_new_tokens=2, projector_lr=5e-3, lr_scheduler="constant",
        warmup_ratio=0.0, report_to=report_to, tracker_init_kwargs={k: v for k, v in QUIET.items() if k in report_to},
    )  # fmt: skip
    loop = Loop(model, processor, small_config(out, **{**base, **settings}), callbacks=callbacks)
    loop.fit(synthetic_vqa(8), eval_data=synthetic_vqa(4, seed=1))
    return loop


@pytest.fixture(scope="module")
def run_all(offline, tmp_path_factory):
    """One fit logging to all five trackers and a custom `Recorder` (the loop writes a predictions page per
    evaluation, before ``on_evaluate``)."""
    out = tmp_path_factory.mktemp("all_trackers") / "run_all"
    recorder = Recorder()
    loop = tracker_run(out, report_to=ALL, predictions_html=True, callbacks=[TrackerLogger([recorder])])
    return {"out": out, "loop": loop, "recorder": recorder, **offline}


# ---------------------------------------------------------------------- what every tracker must hold
def expected_scalars(out: Path) -> dict[tuple[str, int], float]:
    """Every number of metrics.jsonl, by (key, step)."""
    return {
        (key, record["step"]): value
        for record in read_metrics(str(out / "metrics.jsonl"))
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def check_scalars(tracker: str, got: dict[tuple[str, int], float], out: Path, rel: float = 1e-9) -> None:
    expected = expected_scalars(out)
    assert {"train/lr/projector", "eval/exact_match", "eval/gen_tokens_per_s"} <= {k for k, _ in expected}, (
        f"test setup: metrics.jsonl lacks the keys this test is about: {sorted({k for k, _ in expected})}"
    )
    missing = sorted(k for k in expected if k not in got)
    assert not missing, f"{tracker} lacks {len(missing)} metrics.jsonl values (key, step): {missing[:8]}"
    wrong = {k: (got[k], v) for k, v in expected.items() if not math.isclose(got[k], v, rel_tol=rel, abs_tol=1e-12)}
    assert not wrong, f"{tracker} holds other values than metrics.jsonl (tracker, jsonl): {wrong}"


def check_config(tracker: str, got: dict, loop: Loop) -> None:
    want = tracker_config(loop.config.to_dict())
    assert set(got) == set(want), (
        f"{tracker} config keys differ: missing {set(want) - set(got)}, extra {set(got) - set(want)}"
    )
    wrong = {k: (got[k], v) for k, v in want.items() if got[k] != v and str(got[k]) != str(v)}
    assert not wrong, f"{tracker} config values differ (tracker, LoopConfig): {wrong}"


def predictions_file(out: Path, step: int) -> list[dict]:
    lines = (out / "predictions" / f"step_{step:06d}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def check_table(tracker: str, rows: list[dict], out: Path, step: int) -> None:
    """``rows`` (dicts with id and prediction) are the first predictions of the step's predictions file."""
    first = predictions_file(out, step)[: len(rows)]
    assert len(rows) == 4, f"{tracker}: the step-{step} predictions table has {len(rows)} rows, not 4"
    got = [(r["id"], r["prediction"]) for r in rows]
    want = [(r["id"], r["prediction"]) for r in first]
    assert got == want, f"{tracker}: step-{step} table rows {got} are not the predictions file's {want}"


# ---------------------------------------------------------------------- one test per tracker's own reader
def test_tensorboard_holds_every_value_the_config_predictions_images_and_summary(run_all):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugin_util import markdown_to_safe_html
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, folder = run_all["out"], run_all["out"] / "tensorboard" / "run_all"
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    check_scalars("tensorboard", got, out, rel=1e-6)  # float32 in the event file

    hparams = {}
    for sub in (p for p in folder.iterdir() if p.is_dir()):  # add_hparams writes a run of its own in a subfolder
        sub_events = EventAccumulator(str(sub))
        sub_events.Reload()
        try:
            content = sub_events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        except KeyError:
            continue  # accelerate's hparams.yml folder
        values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in values.items()}
    check_config("tensorboard", hparams, run_all["loop"])

    for step in (2, 4):
        (text,) = [e for e in events.Tensors("eval/predictions/text_summary") if e.step == step]
        cells = table_cells(markdown_to_safe_html(text.tensor_proto.string_val[0].decode()))
        assert cells[0] == ["id", "prompt", "prediction", "references", "scores"], f"table header {cells[0]}"
        check_table("tensorboard", [dict(zip(cells[0], row)) for row in cells[1:]], out, step)
    images = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    assert images == {f"eval/images/{k}": [2, 4] for k in range(4)}, f"eval images by tag and step: {images}"

    (summary,) = events.Tensors("summary/text_summary")
    facts = dict(table_cells(markdown_to_safe_html(summary.tensor_proto.string_val[0].decode()))[1:])
    assert summary.step == 4 and facts["stop_reason"] == "completed" and facts["step"] == "4", f"summary {facts}"


def wandb_records(run_file: str) -> list[dict]:
    """The records of a wandb transaction log (.wandb file), read by wandb's own offline reader."""
    import wandb

    core = Path(wandb.__file__).parent / "bin" / "wandb-core"
    args = [str(core), "leet", "inspect", "-json", "-run-file", run_file]
    lines = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    return [json.loads(line) for line in lines]


def test_wandb_offline_run_holds_every_value_the_config_prediction_tables_and_summary(run_all):
    out = run_all["out"]
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(run_file)
    history = [r["history"] for r in records if r["type"] == "history"]
    got = {(k, h["step"]["num"]): v for h in history for k, v in h["item"].items() if isinstance(v, (int, float))}
    check_scalars("wandb", got, out)

    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert (run["project"], run["display_name"]) == ("llava_loop", "run_all"), f"wandb project/name: {run}"
    config = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"].get("update", {}))
    config.pop("_wandb", None)
    check_config("wandb", config, run_all["loop"])

    tables = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert len(tables) == 2, f"one predictions table artifact per evaluation expected, found {len(tables)}"
    for step, artifact in zip((2, 4), tables):
        files = {c["path"]: c["local_path"] for c in artifact["manifest"]["contents"]}
        table = json.loads(Path(files["eval/predictions.table.json"]).read_text())
        check_table("wandb", [dict(zip(table["columns"], row)) for row in table["data"]], out, step)
        pngs = [p for p in files if p.endswith(".png")]
        assert len(pngs) == 4, f"the step-{step} table should carry the 4 eval images, has {pngs}"
    saved = {f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]}
    for step in (2, 4):
        for ext in ("jsonl", "html"):
            assert f"predictions/step_{step:06d}.{ext}" in saved, f"wandb files lack step {step}'s {ext}: {saved}"

    summaries = {}
    for r in records:
        if r["type"] == "summary":
            summaries.update(r["summary"].get("update", {}))
    assert summaries.get("summary/stop_reason") == "completed" and summaries.get("summary/step") == 4, (
        f"wandb run summary lacks the end facts: { {k: v for k, v in summaries.items() if k.startswith('summary/')} }"
    )


def test_mlflow_sqlite_store_in_output_dir_holds_every_value_the_params_files_and_summary(run_all):
    import mlflow

    out = run_all["out"]
    assert not mlflow.is_tracking_uri_set(), "MLflow's tracking URI should be unset again after the run"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llava_loop")
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("run_all", "FINISHED"), f"MLflow run {run.info}"
    assert Path(experiment.artifact_location) == out / "mlflow" / "artifacts", experiment.artifact_location
    got = {(key, m.step): m.value for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)}
    check_scalars("mlflow", got, out)
    check_config("mlflow", run.data.params, run_all["loop"])

    run_id = run.info.run_id
    logged = {a.path for a in client.list_artifacts(run_id, "predictions")}
    files = {f"predictions/step_{s:06d}.{ext}" for s in (2, 4) for ext in ("jsonl", "html")}
    assert logged == files, f"MLflow predictions artifacts {logged}, expected {files}"
    for name in ("step_000002.jsonl", "step_000004.html"):
        artifact = Path(client.download_artifacts(run_id, f"predictions/{name}", str(out.parent / "dl")))
        assert artifact.read_bytes() == (out / "predictions" / name).read_bytes(), f"artifact {name} differs"
    summary = json.loads(Path(client.download_artifacts(run_id, "summary.json", str(out.parent / "dl"))).read_text())
    assert summary == json.loads((out / "summary.json").read_text()), "MLflow's summary.json is not the run's"
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}, "config.yaml artifact missing"


def test_trackio_local_store_holds_every_value_the_config_prediction_tables_and_summary(run_all):
    from trackio.sqlite_storage import SQLiteStorage

    out = run_all["out"]
    assert SQLiteStorage.get_project_db_path("llava_loop").parent == run_all["trackio_dir"], "trackio dir"
    logs = SQLiteStorage.get_logs("llava_loop", "run_all")
    got = {(k, log["step"]): v for log in logs for k, v in log.items() if isinstance(v, (int, float))}
    check_scalars("trackio", got, out)
    config = {k: v for k, v in SQLiteStorage.get_run_config("llava_loop", "run_all").items() if not k.startswith("_")}
    check_config("trackio", config, run_all["loop"])
    tables = {log["step"]: log["eval/predictions"]["_value"] for log in logs if "eval/predictions" in log}
    assert sorted(tables) == [2, 4], f"trackio tables at steps {sorted(tables)}"
    for step, rows in tables.items():
        check_table("trackio", rows, out, step)
        assert all(r["image"]["_type"] == "trackio.image" for r in rows), f"trackio rows lack images: {rows}"
    (summary,) = [log for log in logs if "summary" in log]
    assert summary["step"] == 4 and "completed" in summary["summary"]["_value"], f"trackio summary {summary}"


def test_aim_repo_in_output_dir_holds_every_value_the_hparams_texts_images_and_summary(run_all):
    import aim
    from aim.sdk.index_manager import RepoIndexManager
    from aim.storage.context import Context

    out = run_all["out"]
    repo = aim.Repo(str(out / "aim"))
    (run_hash,) = repo.list_all_runs()
    RepoIndexManager.get_index_manager(repo).index(run_hash)  # what `aim up` does before reading
    run = aim.Run(run_hash, repo=str(out / "aim"), read_only=True)
    assert (run.name, run.experiment) == ("run_all", "llava_loop"), f"aim run {run.name}, {run.experiment}"
    got = {}
    for metric in run.metrics():
        steps, (values, *_) = metric.data.items_list()
        got.update({(metric.name, step): value for step, value in zip(steps, values)})
    check_scalars("aim", got, out)
    check_config("aim", run["hparams"], run_all["loop"])
    steps, texts = run.get_text_sequence("eval/predictions", Context({})).values.sparse_list()
    assert steps == [2, 4], f"aim predictions texts at steps {steps}"
    from tensorboard.plugin_util import markdown_to_safe_html

    for step, text in zip(steps, texts):
        cells = table_cells(markdown_to_safe_html(text.data))
        check_table("aim", [dict(zip(cells[0], row)) for row in cells[1:]], out, step)
    steps, images = run.get_image_sequence("eval/images", Context({})).values.sparse_list()
    assert steps == [2, 4] and [len(i) for i in images] == [4, 4], f"aim images at {steps}: {[len(i) for i in images]}"
    assert run["summary"]["stop_reason"] == "completed" and run["summary"]["step"] == 4, f"{run['summary']}"


def test_a_custom_accelerate_tracker_gets_config_every_value_tables_and_summary(run_all):
    recorder, out = run_all["recorder"], run_all["out"]
    check_config("custom tracker", recorder.config, run_all["loop"])
    got = {(k, step): v for step, values in recorder.logged for k, v in values.items() if not k.startswith("summary/")}
    check_scalars("custom tracker", got, out)
    assert [t[0] for t in recorder.tables] == [2, 4], f"tables at steps {[t[0] for t in recorder.tables]}"
    for step, columns, data in recorder.tables:
        check_table("custom tracker", [dict(zip(columns, row)) for row in data], out, step)
    summary = {k: v for step, values in recorder.logged for k, v in values.items() if k.startswith("summary/")}
    assert summary["summary/step"] == 4 and summary["summary/tokens_seen"] > 0, f"summary numbers {summary}"
    assert recorder.finished, "the custom tracker was not finished"
    assert run_all["loop"].accelerator.trackers == [], "finished trackers are still in accelerator.trackers"
    ids = json.loads((out / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow", "aim"}, f"trackers.json keeps the run ids of {set(ids)}"


# ---------------------------------------------------------------------- failures never stop a run
def test_trackers_failing_at_start_or_mid_run_are_warned_once_and_dropped_while_training_goes_on(
    offline, tmp_path, caplog, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "out"
    broken = [
        Recorder("fails_at_start", "start"),
        Recorder("fails_at_step_3", "log", fail_step=3),
        Recorder("fails_at_table", "table"),
        Recorder("fails_at_finish", "finish"),
    ]
    healthy = Recorder("healthy")
    with caplog.at_level(logging.WARNING, logger="llava_loop"):
        loop = tracker_run(out, report_to=["tensorboard", "mlflow"], callbacks=[TrackerLogger([*broken, healthy])])
    assert loop.state.step == 4 and (out / "checkpoints" / "step_000004").is_dir(), "training did not finish"
    warnings = [r.getMessage() for r in caplog.records if r.name == "llava_loop.trackers"]
    for name, what in [
        ("mlflow", "failed to start (MlflowException"),
        ("fails_at_start", "failed to start (RuntimeError: fails_at_start broke in start)"),
        ("fails_at_step_3", "failed to log step 3 (RuntimeError: fails_at_step_3 broke in log)"),
        ("fails_at_table", "failed to log the predictions of step 2 (RuntimeError: fails_at_table broke in table)"),
        ("fails_at_finish", "failed to finish (RuntimeError: fails_at_finish broke in finish)"),
    ]:
        mine = [w for w in warnings if w.startswith(f"tracker {name!r} ")]
        assert len(mine) == 1, f"expected one warning for {name}, got {mine}"
        assert what in mine[0] and "disabled for the rest of this run" in mine[0], f"warning for {name}: {mine[0]}"
    (mlflow_warning,) = [w for w in warnings if w.startswith("tracker 'mlflow' ")]
    assert "MLFLOW_TRACKING_URI" in mlflow_warning, f"the MLflow warning should say what to check: {mlflow_warning}"
    assert len(warnings) == 5, f"exactly one warning per failing tracker expected: {warnings}"

    every_step = [1, 2, 3, 4]
    steps = sorted({s for s, values in healthy.logged if "train/loss" in values})
    assert steps == every_step and [t[0] for t in healthy.tables] == [2, 4], f"healthy tracker got steps {steps}"
    failing = broken[1]
    assert sorted({s for s, _ in failing.logged}) == [1, 2], "a tracker failing at step 3 got later records"
    assert broken[2].logged and broken[2].tables == [], "the table failure should have dropped only that tracker"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "out"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == every_step, "TensorBoard stopped with the others"
    assert read_metrics(str(out / "metrics.jsonl"))[-1]["step"] == 4, "metrics.jsonl stopped"


class RaisesAtStep2(Callback):
    def on_step_end(self, loop, logs):
        if loop.state.step == 2:
            raise RuntimeError("a bug in the user's callback")


def test_after_a_fit_that_raised_the_next_fit_in_the_process_finishes_its_runs_and_logs_again(
    offline, tmp_path, caplog
):
    import mlflow

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="a bug in the user's callback"):
        tracker_run(out, report_to=["mlflow"], callbacks=[RaisesAtStep2()])  # its MLflow run stays active
    with caplog.at_level(logging.WARNING, logger="llava_loop"):
        tracker_run(out, report_to=["mlflow"], overwrite_output_dir=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == "llava_loop.trackers"]
    assert not warnings, f"the second fit's MLflow run should start cleanly: {warnings}"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llava_loop").experiment_id], order_by=["start_time"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"], f"MLflow runs {[r.info for r in runs]}"
    steps = [m.step for m in client.get_metric_history(runs[1].info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4], f"the second run's train/loss steps {steps}"
    assert mlflow.active_run() is None and not mlflow.is_tracking_uri_set(), "MLflow state left behind"


# ---------------------------------------------------------------------- resume
def test_a_resumed_run_continues_the_same_tracker_runs_and_tensorboard_drops_the_redone_steps(offline, tmp_path):
    import mlflow

    out = tmp_path / "resumed"
    tracker_run(out, report_to=ALL, max_steps=3, save_steps=2, eval_steps=0)  # checkpoints at 2 and 3
    first_ids = json.loads((out / "trackers.json").read_text())
    # Resume from step 2: step 3 is redone (another learning rate makes its values differ).
    resume = str(out / "checkpoints" / "step_000002")
    tracker_run(out, report_to=ALL, max_steps=4, eval_steps=0, resume_from=resume, learning_rate=5e-3)
    assert json.loads((out / "trackers.json").read_text()) == first_ids, "a resumed run started new tracker runs"
    final = {r["step"]: r["train/loss"] for r in read_metrics(str(out / "metrics.jsonl")) if "train/loss" in r}
    assert sorted(final) == [1, 2, 3, 4], f"test setup: metrics.jsonl steps {sorted(final)}"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "resumed"))
    events.Reload()
    tb = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in tb] == [1, 2, 3, 4], f"TensorBoard steps after resume {tb}: redone step 3 not replaced"
    assert all(math.isclose(v, final[s], rel_tol=1e-6) for s, v in tb), f"TensorBoard {tb} vs jsonl {final}"

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("llava_loop").experiment_id])
    assert run.info.run_id == first_ids["mlflow"], "MLflow: not the first session's run"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(s for s, _ in history) == [1, 2, 3, 3, 4], f"MLflow keeps both values of redone step 3: {history}"
    assert math.isclose(history[-1][1], final[4], rel_tol=1e-9), f"MLflow's last value is not step 4's: {history}"

    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert [Path(r).stem for r in runs] == [f"run-{first_ids['wandb']}"] * 2, f"wandb runs {runs}: not one id"
    second = {h["history"]["step"]["num"] for h in wandb_records(runs[1]) if h["type"] == "history"}
    assert second == {3, 4}, f"the resumed wandb session logged steps {second}"

    import aim
    from aim.sdk.index_manager import RepoIndexManager

    repo = aim.Repo(str(out / "aim"))
    assert repo.list_all_runs() == [first_ids["aim"]], f"Aim runs {repo.list_all_runs()}"
    RepoIndexManager.get_index_manager(repo).index(first_ids["aim"])
    from aim.storage.context import Context

    metric = aim.Run(first_ids["aim"], repo=str(out / "aim"), read_only=True).get_metric("train/loss", Context({}))
    steps, (values, *_) = metric.data.items_list()
    assert list(steps) == [1, 2, 3, 4], f"Aim run steps {list(steps)}"
    assert math.isclose(values[2], final[3], rel_tol=1e-9), "Aim keeps the interrupted session's step 3"

    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("llava_loop", "resumed")
    steps = sorted(log["step"] for log in logs if "train/loss" in log)
    assert steps == [1, 2, 3, 3, 4], f"one trackio run with both values of redone step 3 expected: {steps}"


# ---------------------------------------------------------------------- the pieces
def test_tracker_config_turns_every_value_into_what_trackers_accept():
    values = {
        "lr": 2e-4,
        "steps": 3,
        "flag": True,
        "name": "x",
        "none": None,
        "targets": ["q_proj", "v_proj"],
        "pair": (1, 2),
        "empty": {},
        "nested": {"wandb": {"tags": ["a"], "mode": "offline", "deep": {"n": None}}},
        "tensor": torch.tensor(1.5),
        "path": Path("a/b"),
    }
    assert tracker_config(values) == {
        "lr": 2e-4,
        "steps": 3,
        "flag": True,
        "name": "x",
        "none": "None",
        "targets": '["q_proj", "v_proj"]',
        "pair": "[1, 2]",
        "empty": "{}",
        "nested.wandb.tags": '["a"]',
        "nested.wandb.mode": "offline",
        "nested.wandb.deep.n": "None",
        "tensor": 1.5,
        "path": "a/b",
    }, "tracker_config flattened differently"
    flat = tracker_config(LoopConfig(report_to=["wandb"], tracker_init_kwargs={"wandb": {"tags": ["a"]}}).to_dict())
    bad = {k: v for k, v in flat.items() if type(v) not in (bool, int, float, str)}
    assert not bad, f"LoopConfig values a tracker would refuse: {bad}"


def test_non_numeric_log_values_are_left_out_instead_of_crashing_a_tracker():
    recorder, logger = Recorder(), TrackerLogger()
    logger.trackers = {"recorder": recorder}
    logger.on_log(None, {"step": 3, "a": 1.5, "b": "text", "c": None, "d": torch.tensor(2.0), "e": True, "f": [1]})
    assert recorder.logged == [(3, {"a": 1.5, "d": 2.0})], f"logged {recorder.logged}"


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def table_cells(rendered_html: str) -> list[list[str]]:
    """The text of every cell of the tables in ``rendered_html``, row by row (``<br>`` as a newline)."""
    parser = _Cells()
    parser.feed(rendered_html)
    return parser.rows


def test_markdown_tables_show_any_text_literally_in_tensorboard():
    from tensorboard.plugin_util import markdown_to_safe_html

    nasty = [
        ["a|b", "*bold* _it_ `code`", "<script>alert(1)</script> & co", "line 1\nline 2"],
        ["# heading", "[link](http://x) ![img](y)", "back\\slash -- 1. ~strike~", "{} () + ! ."],
    ]
    cells = table_cells(markdown_to_safe_html(markdown_table(["w", "x", "y", "z"], nasty)))
    assert cells == [["w", "x", "y", "z"], *nasty], f"TensorBoard renders the cells as {cells}"


def test_learning_rates_are_logged_per_kind_of_group_with_train_lr_the_main_one():
    class Optimizer:
        param_groups = [
            {"name": "main", "lr": 1e-4},
            {"name": "main_no_decay", "lr": 1e-4},
            {"name": "projector", "lr": 3e-5},
            {"name": "projector_no_decay", "lr": 3e-5},
        ]

    assert learning_rate_logs(Optimizer()) == {"train/lr": 1e-4, "train/lr/projector": 3e-5}
    Optimizer.param_groups = Optimizer.param_groups[:2]
    assert learning_rate_logs(Optimizer()) == {"train/lr": 1e-4}, "one kind of group: train/lr only"


def test_logged_learning_rates_follow_each_groups_schedule(tmp_path):
    model, processor = tiny_llava(seed=0)
    cfg = small_config(tmp_path / "out", max_steps=4, log_steps=1, projector_lr=1e-3, lr_scheduler="linear")
    Loop(model, processor, cfg).fit(synthetic_vqa(8))
    records = [r for r in read_metrics(str(tmp_path / "out" / "metrics.jsonl")) if "train/lr" in r]
    warmup = math.ceil(cfg.warmup_ratio * 4)
    for r in records:
        step = r["step"] - 1  # the rate the step used: before its scheduler step
        factor = step / max(1, warmup) if step < warmup else (4 - step) / max(1, 4 - warmup)
        assert math.isclose(r["train/lr"], cfg.learning_rate * factor, rel_tol=1e-9), f"train/lr at {r}"
        assert math.isclose(r["train/lr/projector"], 1e-3 * factor, rel_tol=1e-9), f"train/lr/projector at {r}"


GPUS = {
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA L4": 121.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA A10G": 125.0,
    "NVIDIA A10": 125.0,
    "NVIDIA GeForce RTX 3090": 71.0,
    "NVIDIA GeForce RTX 4090": 165.2,
    "Tesla V100-SXM2-32GB": 125.0,
    "Tesla V100-PCIE-16GB": 112.0,
    "Tesla T4": 65.0,
    "NVIDIA RTX A6000": 154.8,
    "NVIDIA B200": 2250.0,
    "Some Future GPU": None,
}


def test_gpu_peak_is_found_by_device_name_without_mixing_up_similar_names():
    got = {name: gpu_peak_tflops(name) for name in GPUS}
    assert got == GPUS, f"peaks differ: { {k: (got[k], v) for k, v in GPUS.items() if got[k] != v} }"


def test_mfu_counts_the_language_model_without_input_embedding_and_vision_tower():
    model, _ = tiny_llava()
    decoder, head = model.model.language_model, model.lm_head
    expected = sum(p.numel() for p in decoder.parameters()) - decoder.embed_tokens.weight.numel()
    expected += head.weight.numel()
    assert model_flops_per_token(model) == 6 * expected, "N should be the decoder without input embedding + lm_head"
    from llava_loop.modeling import prepare_model

    lora = prepare_model(model, LoopConfig(output_dir="unused", lora_r=4))
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n and "language_model" in n)
    assert model_flops_per_token(lora) == 6 * (expected + lora_params), "a peft model: its base model's decoder"


def test_mfu_is_six_times_parameters_times_tokens_per_second_over_all_gpus_peak(monkeypatch, caplog):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))  # 40 + 15 parameters
    assert model_flops_per_token(model) == 6 * 55, "a model without a decoder: 6 x all parameters"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")

    def window(throughput: Throughput) -> dict:
        throughput.seconds, throughput.tokens, throughput.samples, throughput.losses = 2.0, 1000.0, 8.0, [1.0]
        return throughput.window(steps_left=0)

    throughput = Throughput()
    throughput.setup_mfu(model, torch.device("cuda", 0), num_processes=2)
    assert math.isclose(window(throughput)["train/mfu"], 6 * 55 * 500 / (2 * 989e12), rel_tol=1e-12), "MFU"
    throughput.setup_mfu(model, torch.device("cuda", 0), num_processes=1, peak_tflops=100.0)  # the override wins
    assert math.isclose(window(throughput)["train/mfu"], 6 * 55 * 500 / 100e12, rel_tol=1e-12), "peak_tflops"

    throughput.setup_mfu(model, torch.device("cpu"), num_processes=1, peak_tflops=100.0)
    assert "train/mfu" not in window(throughput), "no MFU on the CPU"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    with caplog.at_level(logging.INFO, logger="llava_loop"):
        throughput.setup_mfu(model, torch.device("cuda", 0), num_processes=1)
    assert "train/mfu" not in window(throughput), "no MFU for an unknown GPU"
    told = [r.getMessage() for r in caplog.records if "train/mfu" in r.getMessage()]
    assert len(told) == 1 and "Some Future GPU" in told[0] and "peak_tflops" in told[0], f"info: {told}"


def test_tracker_settings_are_checked_before_training(monkeypatch):
    with pytest.raises(ValueError, match=r"tracker_init_kwargs.*report_to"):
        LoopConfig(report_to=["tensorboard"], tracker_init_kwargs={"wandb": {"tags": ["a"]}})
    with pytest.raises(ValueError, match=r"plain data"):
        LoopConfig(report_to=["wandb"], tracker_init_kwargs={"wandb": {"settings": object()}})
    with pytest.raises(ValueError, match=r"run_name"):
        LoopConfig(run_name=" ")
    with pytest.raises(ValueError, match=r"peak_tflops"):
        LoopConfig(peak_tflops=0.0)
    with pytest.raises(ValueError, match=r"'tagz'.*'tags'"):
        check_trackers(["wandb"], {"wandb": {"tagz": ["a"]}})
    with pytest.raises(ValueError, match=r"'project'.*tracker_project"):
        check_trackers(["trackio"], {"trackio": {"project": "p"}})
    with pytest.raises(ValueError, match=r"'flush_sec'.*flush_secs"):
        check_trackers(["tensorboard"], {"tensorboard": {"flush_sec": 5}})
    check_trackers(["mlflow", "aim"], {"mlflow": {"tags": {"a": "b"}}, "aim": {"repo": "aim://host:53800"}})

    import accelerate.tracking

    class Mine(Recorder):
        name = "mine"

    monkeypatch.setitem(accelerate.tracking.LOGGER_TYPE_TO_CLASS, "mine", Mine)  # register_tracker_class
    assert LoopConfig(report_to=["mine"]).report_to == ["mine"], "a registered tracker name is refused"

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    model, processor = tiny_llava(seed=0)
    with pytest.raises(ImportError, match=r"pip install 'llava_loop\[trackers\]'"):
        Loop(model, processor, LoopConfig(report_to=["wandb"], output_dir=os.devnull))
