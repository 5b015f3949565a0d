"""The HTTP microservice and the ``tta`` command line."""
