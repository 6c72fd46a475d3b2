"""The operator review queue: durable store, web page, Kafka bridge."""
