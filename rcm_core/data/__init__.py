"""Built-in data: tasks that sample (x0, cond) batches deterministically from a torch.Generator."""
