"""What a generation does across the mesh: the plan, the sampler and step loop, the head, the stages, the relay between them."""
