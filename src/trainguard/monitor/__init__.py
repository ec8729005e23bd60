"""Watch: attest each training step and raise alerts when it stops being true."""

from trainguard.monitor.alerts import Alert, TrainingStopped
from trainguard.monitor.guard import Guard, watch
from trainguard.monitor.options import WatchOptions

__all__ = ["Alert", "Guard", "TrainingStopped", "WatchOptions", "watch"]
