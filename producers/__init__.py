"""Camera sources and the loop that turns their frames into Kafka frame messages."""
