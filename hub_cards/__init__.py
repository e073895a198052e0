"""Hub-native release: model/dataset cards and `vla-export`."""
