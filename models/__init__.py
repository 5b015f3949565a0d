"""Model code and shipped model artefacts for the text-to-audio service.

Nothing in this package imports ``service``: the service is a client of the models.
"""
