"""Ctrl-C handling for training loops: the first Ctrl-C asks the loop to stop at the next step
boundary (so a checkpoint holds a consistent state); a second one interrupts immediately."""
import signal
import threading


class DeferredInterrupt:
    """Context manager; poll ``requested`` between steps. Outside the main thread it does nothing
    (signals can only be handled there) and Ctrl-C raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
