"""Kafka: the topic registry, the faust app and its agents."""
