"""Trainers (subclasses of nnunetv2's nnUNetTrainer) and the ``spinediff train`` API.

Trainers are found by class name (:mod:`spinediff.training.registry`): a new trainer is one class in one file
of this package.
"""
