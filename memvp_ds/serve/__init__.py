"""memvp-serve: an OpenAI-compatible chat server over an export, with continuous batching.

Modules, bottom to top: ``limits`` (the server's limits), ``prompting`` (chat messages -> the training
prompt), ``images`` (decode and check images, encode them with the export's feature recipe), ``batch``
(the running rows' KV cache: join, leave, align), ``engine`` (the decode loop), ``metrics`` (Prometheus),
``api`` (FastAPI routes, OpenAI schema and errors), ``cli`` (the memvp-serve command).
"""
