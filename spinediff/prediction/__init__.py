"""The prediction core shared by ``spinediff predict`` and the trainers' final validation (see :mod:`.core`) and the
sampling settings resolved once (:mod:`.sampling`)."""
