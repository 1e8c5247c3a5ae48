"""The OpenVINO worker's step loop (backends/openvino/worker.py) with a pipeline that refuses
every request: the refusal reaches the router's side even when it comes while the worker idles.
(The real pipeline in the worker process is tested in test_openvino_pipeline.py.)"""

from __future__ import annotations

import multiprocessing
import threading

from backends.openvino import worker


class RefusingPipeline:
    def add_request(self, *args: object) -> None:
        raise RuntimeError("no room")

    def has_non_finished_requests(self) -> bool:
        return False


def test_a_request_refused_while_idle_is_answered_not_dropped() -> None:
    to_read, to_worker = multiprocessing.Pipe(duplex=False)
    from_worker, to_write = multiprocessing.Pipe(duplex=False)
    stepper = worker._Stepper(RefusingPipeline(), to_read, to_write)
    thread = threading.Thread(target=stepper.run, daemon=True)
    thread.start()
    assert from_worker.recv() == ("idle",)
    to_worker.send(worker.Add(7, (1, 2, 3), {"max_new_tokens": 4, "eos_token_id": 0}, frozenset()))
    kind, outputs, *_ = from_worker.recv()
    assert kind == "step"
    assert outputs == [(7, (), None, "OpenVINO GenAI refused it: no room")]
    assert from_worker.recv() == ("idle",)
    to_worker.send(None)  # stop
    thread.join(timeout=5)
    assert not thread.is_alive()
