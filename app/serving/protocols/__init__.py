"""One module per protocol: each turns its wire form into the core's typed request and the typed result
or error back into its wire form, and declares its routes once (`routes.Route`)."""
