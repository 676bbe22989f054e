"""Looking inside models: reconstructions, cost (parameters, FLOPs), token relations and maps."""
