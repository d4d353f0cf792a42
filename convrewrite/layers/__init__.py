"""Keras layers convrewrite substitutes for convolutions. Each is registered serializable."""
