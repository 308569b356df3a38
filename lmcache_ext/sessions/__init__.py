"""SageMaker stateful sessions: the wire protocol, open sessions, and the pins they hold."""
