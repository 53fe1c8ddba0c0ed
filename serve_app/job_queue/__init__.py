"""Jobs: submit now, watch progress, fetch later. Records and images in a durable store
(`store.py`), one queue holder that drives them through the Generator (`manager.py`)."""
