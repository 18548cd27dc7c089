"""Entry points meant for launchers (``torchrun -m spinediff.run.train``), as nnU-Net's ``run/`` folder."""
