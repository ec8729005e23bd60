"""Watch: attest each training step and raise alerts when it stops being true."""

from trainguard.monitor.guard import Alert, Guard, TrainingStopped, watch

__all__ = ["Alert", "Guard", "TrainingStopped", "watch"]
