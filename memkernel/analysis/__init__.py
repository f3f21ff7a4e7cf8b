"""Looking inside trained models: the causal memory auditor and the routing diagnostic."""
