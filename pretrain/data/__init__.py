"""The trainer's data side: shard reading (`shard_reader`), the global sample order
(`order`) and the DataLoader (`loader`). No Ray imports."""
