"""What-if models: a measured run's costs carried to other ranks, links and cores (`llmpy predict`)."""
