"""Integrations with training frameworks (optional extras): ``neuroexapt.integrations.lightning``
(the ``lightning`` extra)."""
