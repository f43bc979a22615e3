"""The HyTRec network, its data and training; knows nothing of Kafka."""
