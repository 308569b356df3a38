"""A local stand-in for SageMaker's front end: one URL in front of N replicas of the container.

- ``policy``: which replica serves a request without a session (``random``,
  ``least_outstanding``, ``prefix_aware``) and the session table (session id -> replica).
- ``eventstream``: the AWS event-stream framing of ``invoke_endpoint_with_response_stream``.
- ``router``: the HTTP server that forwards (container paths and SageMaker's runtime REST paths).
- ``replicas``: N built-in engine replicas in this process, sharing one loaded model.

Not needed on SageMaker (its front end does this); tests, benchmarks and local runs use it.
"""
