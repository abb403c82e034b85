"""The campaign's run of its subject (campaign.Campaign.run_subject) acts once per run: a
phase line that comes again in pytest's failure report ("Captured log") does not kill the
runner or cut the link a second time, and an action still pending when the run ends is taken
before run_subject returns, not during the campaign's next step."""

from __future__ import annotations

import textwrap
import threading

import campaign

SUBJECT = textwrap.dedent('''
    import logging, sys, time

    log = logging.getLogger("vfiotest")

    def test_subject():
        log.warning("campaign phase: %s", "{phase}")
        print("campaign phase: {phase}", file=sys.stderr, flush=True)
        time.sleep({sleep})
        assert {ok}, "the subject fails: pytest reports its captured log, phase line included"
''')


def _campaign(tmp_path, monkeypatch, phase: str, sleep: float, ok: bool) -> campaign.Campaign:
    (tmp_path / "ci").mkdir()
    (tmp_path / campaign.SUBJECT).write_text(SUBJECT.format(phase=phase, sleep=sleep, ok=ok))
    monkeypatch.setenv("VFIOTEST_STATE_DIR", str(tmp_path / "state"))   # Campaign sets it in os.environ
    c = campaign.Campaign(str(tmp_path), str(tmp_path / "state"), seed=1, quick=True)
    c.env["VFIOTEST_TARGET"] = "local"
    return c


def test_a_phase_line_repeated_in_the_failure_report_acts_once(tmp_path, monkeypatch):
    c = _campaign(tmp_path, monkeypatch, "Kata VM running", sleep=0.5, ok=False)
    calls = []
    r = c.run_subject(kill_phase="Kata VM running", delay=0.2, at_phase=lambda: calls.append(1), timeout=120)
    text = "".join(r["lines"])
    assert r["rc"] == 1
    assert text.count("campaign phase: Kata VM running") >= 3   # stderr, live, and the report's captured log
    assert calls == [1]
    assert r["times"]["Kata VM running"] < r["end"] - 0.4        # the first line's time, not the report's


def test_an_action_pending_at_the_end_of_the_run_is_taken_before_returning(tmp_path, monkeypatch):
    c = _campaign(tmp_path, monkeypatch, "bind", sleep=0, ok=True)
    done = threading.Event()
    r = c.run_subject(kill_phase="bind", delay=3, at_phase=done.set, timeout=120)
    assert r["rc"] == 0
    assert done.is_set()
    assert r["acted"] is not None and r["acted"] >= 3


def test_a_kill_at_the_phase_kills_the_run(tmp_path, monkeypatch):
    c = _campaign(tmp_path, monkeypatch, "group bind", sleep=30, ok=True)
    r = c.run_subject(kill_phase="group bind", delay=0, timeout=120)
    assert r["rc"] == -9
    assert r["end"] < 25
