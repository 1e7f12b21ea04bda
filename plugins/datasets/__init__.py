"""Built-in dataset plugins: shapes, digits, imagefolder, arrayrecord."""
