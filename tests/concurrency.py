"""Run a test's worker on several threads at once and re-raise what any of them raised."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(worker: Callable[[int], None], count: int = 4) -> None:
    """worker(0), ..., worker(count - 1), each on its own thread, all started before any is joined; the first
    exception a worker raised (an assertion included) is raised here after every thread has finished."""
    errors: list[BaseException] = []

    def guarded(k: int) -> None:
        try:
            worker(k)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
