"""Landmark-based MR/CT registration: landmarks from vertebra masks, point-based alignment, QA.

Public API::

    from spinediff.registration import register_dataset, register_case, landmarks_from_masks
"""
