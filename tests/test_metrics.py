"""metrics.jsonl and TensorBoard across a resume: the steps a resumed run repeats are read once,
with the resumed run's values, and the resume itself is recorded."""

from __future__ import annotations

import json

from mmoe_megatron.training.metrics import MetricsLogger, read_metrics


def _log(logger, steps, offset):
    for step in steps:
        logger.log_step(step, 8, {"loss": step + offset, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0},
                        {0: 2}, None)
        logger.log_eval(step, {"2": step + offset})


def test_a_resume_is_recorded_and_repeated_steps_read_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = str(tmp_path)
    first = MetricsLogger(run, enabled=True, tensorboard=True)
    _log(first, range(1, 7), offset=0.0)  # steps 1-6; then a crash, the last checkpoint at 4
    first.writer.flush()
    first.file.write('{"kind": "train", "step": 7, "lo')  # a record cut short by the crash
    first.close()

    second = MetricsLogger(run, enabled=True, tensorboard=True)
    record = second.log_resume(4, f"{run}/checkpoints/step_00000004", ["node1", "node2"], world_size=2)
    _log(second, range(5, 9), offset=0.5)
    second.close()

    history = read_metrics(run)
    assert sorted(history["train"]) == list(range(1, 9))
    assert [history["train"][s]["loss"] for s in range(1, 9)] == [1, 2, 3, 4, 5.5, 6.5, 7.5, 8.5]
    assert [history["eval"][("valid", s)]["loss"]["2"] for s in (4, 5)] == [4, 5.5]
    assert history["resumes"] == [record]
    assert record["step"] == 4 and record["attempt"] == 2 and record["hosts"] == ["node1", "node2"]
    # The cut-short line stays a line of its own: the resume record after it is intact.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[lines.index('{"kind": "train", "step": 7, "lo') + 1])["kind"] == "resume"

    # TensorBoard hides the first attempt's points after the resumed step.
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [(e.step, e.value) for e in scalars] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5.5), (6, 6.5),
                                                    (7, 7.5), (8, 8.5)]


def test_a_third_launch_is_attempt_three(tmp_path):
    for expected in (2, 3):
        logger = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False)
        assert logger.log_resume(4, "ckpt", ["n1"])["attempt"] == expected
        logger.close()
