"""Answer extraction and grading with math-verify, in-process or in a pool with a per-item time limit.

The grader takes the **last** ``\\boxed{...}`` of a response (nested braces and escaped ``\\{``/``\\}``
handled); a response without one, or whose last box is never closed (cut off mid-answer), has no
answer and counts as wrong. The gold is wrapped as ``\\boxed{gold}`` before parsing and passed first
to ``math_verify.verify`` (its comparison is not symmetric), as DESIGN §5 says.

math-verify's own timeout uses SIGALRM, which only works in the main thread, and a signal cannot
interrupt a long C call at all. ``GradingPool`` therefore grades in worker *processes* (reused across
items) and kills and replaces a worker that overruns the per-item limit.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait

BOXED_COMMANDS = ("\\boxed", "\\fbox")
VERDICTS = ("correct", "wrong", "no_answer", "truncated", "timeout", "error")
"""``truncated`` is assigned by the caller (finish reason ``length``/``abort``); never graded."""


def _match_braces(text: str, open_index: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_index`` (escaped braces skipped), or None."""
    depth, i = 0, open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2  # \{ and \} are literal braces (sets), not grouping
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, or None.

    Returns None when there is no box or when the last box is not closed (a truncated answer:
    an earlier, complete box is *not* used, since the model was still changing its answer).
    """
    start = max(text.rfind(cmd) for cmd in BOXED_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in BOXED_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    close = _match_braces(text, i)
    return None if close is None else text[i + 1:close]


def _verify(answer: str, gold: str, timeout_s: int | None) -> bool:
    """math-verify on an extracted answer; raises math-verify's TimeoutException on overrun."""
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout_s, raise_on_error=True)
    answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_s, raise_on_error=True)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout_s, raise_on_error=True))


def grade_verdict(response_text: str, gold_answer: str, timeout_s: int | None = 5) -> str:
    """Verdict in ``VERDICTS`` (never ``truncated``) for one response. Main thread only when timed."""
    from math_verify.errors import TimeoutException

    answer = extract_last_boxed(response_text)
    if answer is None or not answer.strip():
        return "no_answer"
    try:
        return "correct" if _verify(answer, str(gold_answer), timeout_s) else "wrong"
    except TimeoutException:
        return "timeout"
    except Exception:  # a parser crash on odd LaTeX is a wrong answer, not a crashed run
        return "error"


def grade(response_text: str, gold_answer: str) -> bool:
    """True iff the last ``\\boxed{}`` of ``response_text`` equals ``gold_answer`` (math-verify).

    Runs in the calling process with math-verify's 5 s SIGALRM timeouts in the main thread (no
    timeout elsewhere: SIGALRM is main-thread only). For many items use ``GradingPool``.
    """
    in_main = threading.current_thread() is threading.main_thread()
    return grade_verdict(response_text, gold_answer, timeout_s=5 if in_main else None) == "correct"


def _worker_main(conn, inner_timeout_s: int) -> None:
    """Worker process loop: receive ``(index, response, gold)``, send back ``(index, verdict)``."""
    import math_verify  # noqa: F401  (import once up front: sympy takes ~1 s)

    conn.send("ready")  # the per-item clock starts only after this slow import
    while True:
        task = conn.recv()
        if task is None:
            return
        index, response, gold = task
        conn.send((index, grade_verdict(response, gold, timeout_s=inner_timeout_s)))


class _Worker:
    """One grading process and its pipe; ``task``/``started`` describe the item in flight."""

    def __init__(self, ctx, inner_timeout_s: int):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn, inner_timeout_s), daemon=True)
        self.process.start()
        child_conn.close()
        self.task: int | None = None
        self.started = 0.0
        self.ready = False

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until the worker has imported math-verify (it reports "ready")."""
        if not self.ready:
            if not self.conn.poll(timeout_s) or self.conn.recv() != "ready":
                raise RuntimeError(f"grading worker pid {self.process.pid} did not start within {timeout_s} s")
            self.ready = True

    def submit(self, index: int, response: str, gold: str) -> None:
        self.wait_ready()
        self.conn.send((index, response, gold))
        self.task, self.started = index, time.monotonic()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class GradingPool:
    """Grades many ``(response, gold)`` pairs in reused worker processes, each item time-limited.

    ``timeout_s`` is the hard per-item limit: a worker still busy after it is killed and replaced,
    and the item's verdict is ``timeout``. math-verify's own (cheaper, signal-based) timeout runs
    inside the worker at ``verifier_timeout_s`` (default: half the hard limit, at least 1 s).
    Use as a context manager so the workers are shut down.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, verifier_timeout_s: int | None = None):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"GradingPool: need num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}")
        self.timeout_s = timeout_s
        self.inner_timeout_s = verifier_timeout_s or max(1, math.floor(timeout_s / 2))
        # spawn, not fork: the parent may hold torch threads, and fork + threads can deadlock.
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx, self.inner_timeout_s) for _ in range(num_workers)]
        self.num_killed = 0

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
                worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.kill()
        self._workers = []

    def grade_many(self, items: Sequence[tuple[str, str]]) -> list[str]:
        """Verdicts (see ``VERDICTS``) for ``items`` = ``[(response_text, gold_answer), ...]``, in order."""
        verdicts: list[str | None] = [None] * len(items)
        pending = deque(range(len(items)))
        # Items without a box never reach a worker.
        for i, (response, _) in enumerate(items):
            answer = extract_last_boxed(response)
            if answer is None or not answer.strip():
                verdicts[i] = "no_answer"
        pending = deque(i for i in pending if verdicts[i] is None)
        while pending or any(w.task is not None for w in self._workers):
            self._dispatch(pending, items)
            self._collect(verdicts)
            self._reap_overdue(verdicts)
        return verdicts  # type: ignore[return-value]

    def _dispatch(self, pending: deque, items: Sequence[tuple[str, str]]) -> None:
        for worker in self._workers:
            if worker.task is None and pending:
                index = pending.popleft()
                worker.submit(index, items[index][0], str(items[index][1]))

    def _collect(self, verdicts: list) -> None:
        busy = {w.conn: w for w in self._workers if w.task is not None}
        if not busy:
            return
        now = time.monotonic()
        next_deadline = min(w.started + self.timeout_s for w in busy.values())
        for conn in wait(list(busy), timeout=max(0.0, next_deadline - now)):
            worker = busy[conn]
            try:
                index, verdict = conn.recv()
            except (EOFError, OSError):  # the worker died (e.g. out of memory): replace it
                verdicts[worker.task] = "error"
                self._replace(worker)
                continue
            verdicts[index] = verdict
            worker.task = None

    def _reap_overdue(self, verdicts: list) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task is not None and now - worker.started > self.timeout_s:
                verdicts[worker.task] = "timeout"
                self.num_killed += 1
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx, self.inner_timeout_s)
