"""Visual token compression: temporal reuse at the encoder and task-relevant token pruning."""
