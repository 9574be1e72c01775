"""The write path: transports turn bytes into Uplinks; the pipeline batches, decodes, stores, then acks."""
