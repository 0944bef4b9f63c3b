"""Host adapters.  Each module here is thin glue between one host and the ``fasterdiffusion`` engine."""
