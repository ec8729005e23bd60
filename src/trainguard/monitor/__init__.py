"""Watch: attest each training step and raise alerts when it stops being true."""

from trainguard.monitor.alerts import Alert, TrainingStopped
from trainguard.monitor.guard import Guard, watch
from trainguard.monitor.options import WatchOptions

__all__ = ["Alert", "Guard", "TrainingStopped", "WatchOptions", "watch"]

# trainguard.monitor's own module state as import left it (monitor/ownstate.py): the
# self-check names a table cleared or a threshold rebound before watch() started.
from trainguard.monitor.integrity import take_own_state

take_own_state()
