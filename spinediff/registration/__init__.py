"""Landmark-based MR/CT registration: landmarks from vertebra masks, point-based alignment, QA.

Public API (see ``spinediff.registration.api``)::

    from spinediff.registration.api import RegistrationSettings, find_unaligned_cases, register_dataset

    cases = find_unaligned_cases("Dataset902_SpinePhantomTranslation/unaligned")
    result = register_dataset(cases, "Dataset912_Registered", RegistrationSettings(transform="rigid"))

Modules: ``landmarks`` (landmarks from masks / JSON), ``align`` (matching, point-based fits,
resampling, errors), ``mask_alignment`` (mask landmarks on the common field of view), ``report``
(per-case JSON, Markdown summary, PNG overlay), ``inputs`` (case files), ``api`` (the typed entry
points), ``register_command`` (the CLI).
"""
