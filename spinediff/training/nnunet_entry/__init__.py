"""Folder for nnU-Net's nnUNet_extTrainer variable (see spinediff_trainers.py)."""
